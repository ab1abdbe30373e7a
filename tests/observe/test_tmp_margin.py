import time, requests
from observe_helpers import *
from reconciler.observe.prometheus import PrometheusMetricsSource
def test_margin(prometheus_stack):
    for _ in range(4):
        with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as s:
            m = s.fetch(fleet_policies(), time.time())
        errs = [abs(v.decode_tps.value/100-1) for k,v in m.items() if k.startswith("fleet")]
        print("fleet max err", max(errs), s.last_report.duration_s, [round(q.seconds,3) for q in s.last_report.queries])
        time.sleep(1)
    for q in ["max_over_time(scrape_duration_seconds[1m])", "min_over_time(up[1m])", "count_over_time(up[1m])", "scrape_samples_scraped"]:
        r = requests.get(prometheus_stack.url+"/api/v1/query", params={"query": q}).json()["data"]["result"]
        print(q, [(x["metric"]["instance"], x["value"][1]) for x in r])
