"""The operator at scale: N FineTuneJobs x W workers at once on simulated AMX nodes.

On its own control plane (etcd, kube-apiserver, scheduler, controller-manager, kwok), with
the operator as a real process, this creates N jobs in one `kubectl create` and measures:
the time until every worker pod is bound to a node and until every job reports Running
(both counted from the last job's creation), the operator's peak RSS and CPU time, and its
API requests per second (its own `amxtune_api_requests_total`, every request its
reconcilers send) over a steady window while all N jobs run. tests/cluster/test_scale.py
holds a smaller N to the targets in CI; for the full report:

    python -m tests.support.scale --jobs 1000 --nodes 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.support.controlplane import ControlPlane, amx_nodes, ensure_binaries, free_port
from tests.support.jobs import job, volume
from tests.support.operator import OperatorProcess, install_crds

NAMESPACE = "scale"
SCALE_TAINT = {"key": "amxtune.io/scale-test", "value": "true", "effect": "NoSchedule"}

# Targets of the operator at 1000 jobs (issue 12; docs/performance.md).
BOUND_SECONDS_TARGET = 120.0
JOBS_PER_REQUEST_PER_SECOND_TARGET = 50  # at most 1 request/s per 50 running jobs
RSS_MIB_TARGET = 250.0


@dataclass
class ScaleReport:
    jobs: int
    workers_per_job: int
    nodes: int
    create_seconds: float  # the one `kubectl create` of all jobs
    bound_seconds: float  # after the last job was created: every worker pod bound
    running_seconds: float  # after the last job was created: every job Running
    drained_seconds: float  # after the last job was created: the operator's queue empty
    steady_window_seconds: float
    steady_requests_per_second: float
    steady_requests_per_second_by_verb: dict[str, float]
    burst_requests: int  # from the operator's start to the end of the start-up
    operator_peak_rss_mib: float
    operator_cpu_seconds_burst: float
    operator_cpu_percent_steady: float
    periodic_period_seconds: float  # how often each running job is looked at in steady state
    cpu: str

    def table(self) -> str:
        rows = [
            ("jobs x workers on nodes", f"{self.jobs} x {self.workers_per_job} on {self.nodes}",
             ""),
            ("create all jobs (kubectl)", f"{self.create_seconds:.1f} s", ""),
            ("every worker pod bound", f"{self.bound_seconds:.1f} s",
             f"<= {BOUND_SECONDS_TARGET:.0f} s"),
            ("every job Running", f"{self.running_seconds:.1f} s", ""),
            ("operator's queue drained", f"{self.drained_seconds:.1f} s", ""),
            ("operator requests, start-up", f"{self.burst_requests}", ""),
            ("operator CPU, start-up", f"{self.operator_cpu_seconds_burst:.1f} s", ""),
            ("operator requests/s, steady", f"{self.steady_requests_per_second:.2f} "
             f"(over {self.steady_window_seconds:.0f} s)",
             f"<= {self.jobs / JOBS_PER_REQUEST_PER_SECOND_TARGET:.1f}"),
            ("  of which", ", ".join(f"{verb} {rate}" for verb, rate in
                                     self.steady_requests_per_second_by_verb.items()), ""),
            ("each job looked at every", f"{self.periodic_period_seconds:.0f} s", ""),
            ("operator CPU, steady", f"{self.operator_cpu_percent_steady:.1f} %", ""),
            ("operator peak RSS", f"{self.operator_peak_rss_mib:.0f} MiB",
             f"<= {RSS_MIB_TARGET:.0f} MiB"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"CPU: {self.cpu}", f"{'measure':<{width}}  {'value':<24}  target"]
        lines += [f"{name:<{width}}  {value:<24}  {target}" for name, value, target in rows]
        return "\n".join(lines)


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    amx = " with AMX" if "amx_tile" in info else ""
    return f"{model.group(1) if model else platform.processor()}{amx}, {os.cpu_count()} cores"


def _proc_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def _proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _requests_by_verb(metrics_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for verb, value in re.findall(r'^amxtune_api_requests_total\{[^}]*verb="(\w+)"[^}]*\} (\S+)$',
                                  text, re.MULTILINE):
        found[verb] = found.get(verb, 0.0) + float(value)
    return found


def _requests(metrics_url: str) -> float:
    return sum(_requests_by_verb(metrics_url).values())


def _metric(metrics_url: str, name: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else float("nan")


def _passed_settings() -> dict[str, str]:
    """AMXTUNE_* settings of this process (e.g. AMXTUNE_RECONCILE_WORKERS) go to the operator."""
    return {key: value for key, value in os.environ.items() if key.startswith("AMXTUNE_")}


def scale_job(name: str, workers: int) -> dict:
    doc = job(name)
    doc["spec"]["workers"] = {
        "nodes": workers, "ranksPerNode": 1, "resources": {"cpu": "2", "memory": "1Gi"},
        "nodeSelector": {"amxtune.io/scale-test": "true"},
        "tolerations": [{"key": SCALE_TAINT["key"], "operator": "Equal",
                         "value": SCALE_TAINT["value"], "effect": "NoSchedule"}],
    }
    doc["spec"]["output"] = {"pvc": {"claimName": "shared-output"}}
    doc["spec"]["model"] = {"name": "tiny"}
    doc["spec"].pop("export", None)
    return doc


def _pods_bound(cp: ControlPlane) -> int:
    out = cp.kubectl("get", "pods", "-n", NAMESPACE, "--no-headers",
                     "-o", "custom-columns=NODE:.spec.nodeName").stdout
    return sum(1 for line in out.splitlines() if line.strip() not in ("", "<none>"))


def _jobs_running(cp: ControlPlane) -> int:
    out = cp.kubectl("get", "finetunejobs", "-n", NAMESPACE, "--no-headers",
                     "-o", "custom-columns=NAME:.metadata.name,PHASE:.status.phase,"
                     "STALLED:.status.conditions[?(@.type=='Stalled')].status,"
                     "MESSAGE:.status.message").stdout
    rows = [line.split(None, 3) for line in out.splitlines() if line.strip()]
    stalled = [row for row in rows if len(row) > 2 and row[2] == "True"]
    if stalled:
        raise RuntimeError(f"{len(stalled)} job(s) stalled, e.g. {' '.join(stalled[0])}")
    return sum(1 for row in rows if row[1] == "Running")


def _wait(condition, timeout: float, what: str, poll: float = 2.0) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} not reached in {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic()


def run_scale(cp: ControlPlane, jobs: int, workers: int, nodes: int, metrics_port: int,
              steady_seconds: float = 60.0, timeout: float = 900.0) -> ScaleReport:
    cp.create_nodes(amx_nodes(nodes, prefix="scale-", cpu="112", memory="512Gi", pods="250",
                              labels={"amxtune.io/scale-test": "true"}, taints=[SCALE_TAINT]))
    install_crds(cp)
    cp.create_namespace(NAMESPACE)
    volume(cp, NAMESPACE, "concepts")
    volume(cp, NAMESPACE, "shared-output")
    operator = OperatorProcess(
        cp, NAMESPACE, extra_env={"AMXTUNE_HUB_ENDPOINT": "", **_passed_settings()},
        flags=["--liveness", "", "--metrics-port", str(metrics_port), "--log-format", "plain"],
    ).start()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        _wait(lambda: _try(lambda: _requests(metrics_url) >= 0), 60, "operator metrics")
        pid = operator.process.pid
        manifest = {"apiVersion": "v1", "kind": "List",
                    "items": [scale_job(f"scale-{i:04d}", workers) for i in range(jobs)]}
        started = time.monotonic()
        cp.kubectl("create", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest),
                   timeout=timeout)
        created = time.monotonic()
        bound = _wait(lambda: _jobs_running(cp) >= 0 and _pods_bound(cp) >= jobs * workers,
                      timeout, "every pod bound")
        running = _wait(lambda: _jobs_running(cp) >= jobs, timeout, "every job Running")
        burst_requests = int(_requests(metrics_url))
        burst_cpu = _proc_cpu_seconds(pid)
        # steady: once the start-up's queue has drained, count over a window
        _wait(lambda: _metric(metrics_url, "amxtune_workqueue_depth") == 0, timeout,
              "the operator's queue drained")
        drained = time.monotonic()
        time.sleep(10)
        # every job is looked at once per period: a window of a whole period sees each once
        steady_seconds = max(steady_seconds,
                             _metric(metrics_url, "amxtune_periodic_period_seconds") + 5)
        by_verb_before, cpu_before = _requests_by_verb(metrics_url), _proc_cpu_seconds(pid)
        requests_before = sum(by_verb_before.values())
        window_start = time.monotonic()
        time.sleep(steady_seconds)
        window = time.monotonic() - window_start
        by_verb_after, cpu_after = _requests_by_verb(metrics_url), _proc_cpu_seconds(pid)
        requests_after = sum(by_verb_after.values())
        steady_by_verb = {verb: round((count - by_verb_before.get(verb, 0.0)) / window, 2)
                          for verb, count in sorted(by_verb_after.items())}
        return ScaleReport(
            jobs=jobs, workers_per_job=workers, nodes=nodes,
            create_seconds=created - started,
            bound_seconds=bound - created, running_seconds=running - created,
            drained_seconds=drained - created,
            steady_window_seconds=window,
            steady_requests_per_second=(requests_after - requests_before) / window,
            steady_requests_per_second_by_verb=steady_by_verb,
            burst_requests=burst_requests,
            operator_peak_rss_mib=_proc_rss_mib(pid),
            operator_cpu_seconds_burst=burst_cpu,
            operator_cpu_percent_steady=100 * (cpu_after - cpu_before) / window,
            periodic_period_seconds=_metric(metrics_url, "amxtune_periodic_period_seconds"),
            cpu=cpu_model(),
        )
    finally:
        operator.stop()



def baseline_bound_seconds(cp: ControlPlane, pods: int, nodes: int,
                           timeout: float = 900.0) -> float:
    """The floor this control plane sets: `pods` bare pods with the workers' scheduling
    constraints, created in one `kubectl create`, until all are bound (no operator)."""
    cp.create_nodes(amx_nodes(nodes, prefix="scale-", cpu="112", memory="512Gi", pods="250",
                              labels={"amxtune.io/scale-test": "true"}, taints=[SCALE_TAINT]))
    cp.create_namespace(NAMESPACE)
    worker = scale_job("x", 1)["spec"]["workers"]
    items = [{"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": f"bare-{i:05d}", "labels": {"amxtune.io/job": "bare"}},
              "spec": {"containers": [{"name": "c", "image": "busybox", "resources": {
                  "requests": {"cpu": worker["resources"]["cpu"],
                               "memory": worker["resources"]["memory"]}}}],
                       "nodeSelector": worker["nodeSelector"],
                       "tolerations": worker["tolerations"]}} for i in range(pods)]
    cp.kubectl("create", "-n", NAMESPACE, "-f", "-", timeout=timeout,
               input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    created = time.monotonic()
    return _wait(lambda: _pods_bound(cp) >= pods, timeout, "every bare pod bound") - created


def _try(check) -> bool:
    try:
        return bool(check())
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4, help="worker pods per job")
    parser.add_argument("--nodes", type=int, default=100, help="simulated AMX nodes")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON too")
    parser.add_argument("--baseline", action="store_true",
                        help="only time jobs x workers bare pods until bound (no operator)")
    args = parser.parse_args(argv)
    if args.baseline:
        with ControlPlane(ensure_binaries()) as cp:
            seconds = baseline_bound_seconds(cp, args.jobs * args.workers, args.nodes)
        print(f"CPU: {cpu_model()}\n{args.jobs * args.workers} bare pods on {args.nodes} "
              f"nodes, created at once: all bound {seconds:.1f} s after the create returned")
        return 0
    with ControlPlane(ensure_binaries()) as cp:
        report = run_scale(cp, args.jobs, args.workers, args.nodes, free_port(),
                           steady_seconds=args.steady_seconds)
    print(report.table())
    if args.json:
        print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
