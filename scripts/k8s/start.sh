#!/usr/bin/env bash
# Start a throw-away Kubernetes control plane on loopback (no kubelet, no Docker).
#
#   scripts/k8s/start.sh STATE_DIR BIN_DIR
#
# Environment:
#   API_PORT, ETCD_PORT     loopback ports (etcd also uses ETCD_PORT+1); a free port
#                           is picked for each one that is unset
#   HETEROSCALE_K8S_CONTROLLERS=0   start only etcd + kube-apiserver (no controller
#                           manager / scheduler: Deployments then get no Pods)
#   HETEROSCALE_K8S_EXTRA_TOKENS    extra lines for the static token file
#                           ("token,user,uid,group1,group2")
#
# Writes STATE_DIR/kubeconfig (bearer token "test-token", group system:masters),
# STATE_DIR/pki/ (CA, serving cert, service-account keys), STATE_DIR/*.pid and
# STATE_DIR/apiserver.sh (restarts only the API server against the same etcd; the
# tests use it to kill the API server mid-apply). Waits for /readyz (about 4 s).
# Stop with scripts/k8s/stop.sh STATE_DIR.
#
# ServiceAccount admission and TaintNodesByCondition are disabled so fake Nodes stay
# schedulable and Pods need no token volume; the node-lifecycle controller is left
# out because it would mark kubelet-less Nodes unreachable.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 STATE_DIR BIN_DIR" >&2; exit 2; }
S=$(mkdir -p "$1" && cd "$1" && pwd); B=$(cd "$2" && pwd)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
free_pair() {  # a free port whose successor is free too (etcd peer port)
  for _ in $(seq 50); do
    p=$(free_port)
    python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', $p + 1))" 2>/dev/null && { echo "$p"; return; }
  done
  echo "no free port pair" >&2; exit 1
}
API=${API_PORT:-$(free_port)}; EP=${ETCD_PORT:-$(free_pair)}; PP=$((EP + 1))
command -v etcd >/dev/null || { echo "etcd not found (apt-get install etcd-server, or scripts/k8s/ensure-binaries.sh)" >&2; exit 1; }
[ -x "$B/kube-apiserver" ] || { echo "$B/kube-apiserver not found (run scripts/k8s/ensure-binaries.sh)" >&2; exit 1; }

P=$S/pki; mkdir -p "$P"
if [ ! -f "$P/sa.key" ]; then
  (cd "$P"
   openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=heteroscale-test-ca -keyout ca.key -out ca.crt
   openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout api.key -out api.csr
   echo subjectAltName=IP:127.0.0.1,DNS:localhost >san.ext
   openssl x509 -req -in api.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile san.ext -out api.crt
   openssl genrsa -out sa.key 2048
   openssl rsa -in sa.key -pubout -out sa.pub) >/dev/null 2>&1
fi
{ echo "test-token,admin,admin,system:masters"
  [ -n "${HETEROSCALE_K8S_EXTRA_TOKENS:-}" ] && printf '%s\n' "$HETEROSCALE_K8S_EXTRA_TOKENS"; } >"$P/tokens.csv"

etcd --name t --data-dir "$S/etcd" --listen-client-urls "http://127.0.0.1:$EP" \
  --advertise-client-urls "http://127.0.0.1:$EP" --listen-peer-urls "http://127.0.0.1:$PP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PP" --initial-cluster "t=http://127.0.0.1:$PP" \
  >"$S/etcd.log" 2>&1 &
echo $! >"$S/etcd.pid"

cat >"$S/apiserver.sh" <<SH
#!/usr/bin/env bash
# (Re)start kube-apiserver against the running etcd; waits until /readyz answers.
set -euo pipefail
"$B/kube-apiserver" --etcd-servers=http://127.0.0.1:$EP --bind-address=127.0.0.1 \\
  --advertise-address=127.0.0.1 --secure-port=$API --tls-cert-file=$P/api.crt \\
  --tls-private-key-file=$P/api.key --client-ca-file=$P/ca.crt --token-auth-file=$P/tokens.csv \\
  --authorization-mode=RBAC --service-account-key-file=$P/sa.pub \\
  --service-account-signing-key-file=$P/sa.key --service-account-issuer=https://kubernetes.default.svc \\
  --service-cluster-ip-range=10.96.0.0/24 --endpoint-reconciler-type=none --profiling=false \\
  --disable-admission-plugins=ServiceAccount,TaintNodesByCondition >>"$S/apiserver.log" 2>&1 &
echo \$! >"$S/apiserver.pid"
for i in \$(seq 240); do
  curl -sf --cacert "$P/ca.crt" -H "Authorization: Bearer test-token" "https://127.0.0.1:$API/readyz" >/dev/null && exit 0
  kill -0 "\$(cat "$S/apiserver.pid")" 2>/dev/null || { tail -20 "$S/apiserver.log" >&2; exit 1; }
  sleep 0.25
done
tail -20 "$S/apiserver.log" >&2; exit 1
SH
chmod +x "$S/apiserver.sh"
"$S/apiserver.sh"

K=$S/kubeconfig
cat >"$K" <<KC
apiVersion: v1
kind: Config
clusters: [{name: heteroscale-test, cluster: {server: "https://127.0.0.1:$API", certificate-authority: "$P/ca.crt"}}]
users: [{name: admin, user: {token: test-token}}]
contexts: [{name: heteroscale-test, context: {cluster: heteroscale-test, user: admin}}]
current-context: heteroscale-test
KC

if [ "${HETEROSCALE_K8S_CONTROLLERS:-1}" != 0 ]; then
  C="--kubeconfig=$K --leader-elect=false --bind-address=127.0.0.1 --secure-port=0 --port=0"
  if [ -x "$B/kube-controller-manager" ]; then
    # shellcheck disable=SC2086
    "$B/kube-controller-manager" $C --controllers=deployment,replicaset,garbagecollector,namespace \
      --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" >"$S/kcm.log" 2>&1 &
    echo $! >"$S/kcm.pid"
  fi
  if [ -x "$B/kube-scheduler" ]; then
    # shellcheck disable=SC2086
    "$B/kube-scheduler" $C >"$S/sched.log" 2>&1 &
    echo $! >"$S/sched.pid"
  fi
fi
echo "API_PORT=$API" >"$S/ports.env"; echo "ETCD_PORT=$EP" >>"$S/ports.env"
echo "KUBECONFIG=$K"
