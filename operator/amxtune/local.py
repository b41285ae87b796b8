"""`amxtune run FILE`: run a FineTuneJob manifest on this machine, without a cluster.

The manifest is validated by the same models as in the operator, and the trainer gets the
same config and rank environment the worker pods get, with local paths: a volume claim
`{claimName: X, path: P}` is the folder `X/P` beside the manifest (or `--volume X=DIR`), and
results go to `./amxtune-output/NAME/`. Ranks run as local processes (`amxtune-train launch`,
as in the pods), capped by the cores this process may use (`ranksPerNode: auto` decides for
this machine's cores and memory, as the operator does for a pod); a failing rank's traceback
goes to `NAME/logs/`. `workers.requireAmx` is a scheduling rule: here the job runs on this machine's
CPU, whatever it has (the trainer says which precision it chose). Ctrl-C stops every rank;
running the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amxtune import manifest
from amxtune.render import JobIdentity, rank_environment, trainer_config
from amxtune.render.finetunejob import LOGS_DIR, TRAINER_COMMAND, auto_ranks_per_node
from amxtune.settings import Settings
from amxtune_api.events import (
    ExportCompleted,
    TrainingCompleted,
    TrainingProgress,
    TrainingStarted,
)
from amxtune_api.finetunejob import AUTO, LORA_FILE, FineTuneJobSpec, Method, ModelSource
from amxtune_api.inferencejob import InferenceTask
from amxtune_api.kube import PvcPath

# Environment the pods get that makes no sense on a workstation.
CLUSTER_ONLY_ENV = {"HF_HOME", "AMXTUNE_CACHE", "MPLCONFIGDIR", "MASTER_ADDR", "MASTER_PORT",
                    "I_MPI_HYDRA_IFACE", "GLOO_SOCKET_IFNAME", "HF_TOKEN"}


class LocalRunError(manifest.ManifestError):
    """A manifest that cannot run here as given; says which flag or folder fixes it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="use this model instead (e.g. 'tiny' to run offline)")
    parser.add_argument("--data", type=Path, help="folder of concept images (overrides spec.data)")
    parser.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                        help="local folder standing for a PersistentVolumeClaim")
    parser.add_argument("--output", type=Path, default=Path("amxtune-output"),
                        help="results go to OUTPUT/NAME (default ./amxtune-output)")
    parser.add_argument("--ranks", type=int, help="training processes (default: the manifest's "
                        "nodes x ranksPerNode, capped by the local cores; ranksPerNode: auto "
                        "decides for this machine's cores and memory)")
    parser.add_argument("--max-train-steps", type=int, help="override spec.training.maxTrainSteps")
    parser.add_argument("--no-export", action="store_true", help="skip the OpenVINO export")


class LocalPlan:
    """Everything `amxtune run` will do, decided before anything runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        items = manifest.load(args.file)
        jobs = [i for i in items if i.identity.kind == "FineTuneJob"]
        if len(jobs) != 1:
            raise LocalRunError(f"{args.file}: expected one FineTuneJob, found {len(jobs)}")
        item = jobs[0]
        self.job: JobIdentity = item.identity
        spec: FineTuneJobSpec = item.spec  # type: ignore[assignment]
        self.base = Path(args.file).resolve().parent
        self.volumes = self._volumes(args.volume)
        if args.model:
            spec = spec.model_copy(update={"model": ModelSource(name=args.model)})
        if args.max_train_steps:
            training = spec.training.model_copy(update={"max_train_steps": args.max_train_steps})
            spec = spec.model_copy(update={"training": training})
        self.spec = spec
        self.data_dir = self._data_dir(args.data)
        self.model = self._model()
        self.output_dir = (args.output / self.job.name).resolve()
        cores = len(os.sched_getaffinity(0))
        if spec.workers.ranks_per_node == AUTO:  # this machine is the one node
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            wanted, self.layout_reason = auto_ranks_per_node(cores, 0, memory)
        else:
            wanted = spec.workers.nodes * int(spec.workers.ranks_per_node)
            self.layout_reason = None
        self.ranks = args.ranks or max(1, min(wanted, cores))
        if self.ranks < 1:
            raise LocalRunError("--ranks must be at least 1")
        self.threads = max(1, cores // self.ranks)
        self.export = spec.export is not None and not args.no_export

    def _volumes(self, pairs: list[str]) -> dict[str, Path]:
        volumes = {}
        for pair in pairs:
            claim, sep, folder = pair.partition("=")
            if not sep or not claim or not folder:
                raise LocalRunError(f"--volume {pair!r}: expected CLAIM=DIR")
            volumes[claim] = Path(folder).resolve()
        return volumes

    def _claim_root(self, claim: str) -> Path:
        return self.volumes.get(claim, self.base / claim)

    def _claim_dir(self, ref: PvcPath, field: str) -> Path:
        folder = self._claim_root(ref.claim_name) / ref.path
        if not folder.is_dir():
            raise LocalRunError(
                f"{field}: claim {ref.claim_name!r} is the folder {folder} on this machine, which "
                f"does not exist; pass --volume {ref.claim_name}=DIR"
                + (" or --data DIR" if field == "spec.data.pvc" else "")
            )
        return folder

    def _data_dir(self, override: Path | None) -> Path:
        if override is not None:
            if not override.is_dir():
                raise LocalRunError(f"--data {override}: not a folder")
            return override.resolve()
        if self.spec.data.pvc is None:
            raise LocalRunError("spec.data.configMap cannot be read without a cluster; pass "
                                "--data DIR with the images")
        return self._claim_dir(self.spec.data.pvc, "spec.data.pvc")

    def _model(self) -> str:
        if self.spec.model.pvc is not None:
            return str(self._claim_dir(self.spec.model.pvc, "spec.model.pvc"))
        assert self.spec.model.name is not None
        return self.spec.model.name

    def trainer_config(self) -> dict:
        config = trainer_config(self.job, self.spec).model_copy(
            update={
                "pretrained_model_name_or_path": self.model,
                "train_data_dir": str(self.data_dir),
                "output_dir": str(self.output_dir),
                "require_amx": False,
            }
        )
        return config.to_wire()

    def environment(self) -> dict[str, str]:
        """The pods' rank environment, adapted: local threads, preloads that exist here (after
        the user's own LD_PRELOAD, which is kept)."""
        env = dict(os.environ)
        own_preload = env.get("LD_PRELOAD", "")
        for item in rank_environment(self.job, self.spec, Settings(), node_rank=0):
            if "value" in item and item["name"] not in CLUSTER_ONLY_ENV:
                env[item["name"]] = item["value"]
        env["OMP_NUM_THREADS"] = str(self.threads)
        # the trainer's own progress bar replaces the libraries' loading bars and chatter
        for quiet in ("HF_HUB_DISABLE_PROGRESS_BARS", "DIFFUSERS_NO_ADVISORY_WARNINGS"):
            env.setdefault(quiet, "1")
        for library in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            env.setdefault(library, "error")
        wanted = f"{own_preload}:{env.get('LD_PRELOAD', '')}".split(":")
        preload = [p for p in wanted if p and Path(p).exists()]
        prefix_iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if self.spec.runtime.open_mp == "iomp5" and prefix_iomp.exists():
            preload.append(str(prefix_iomp))
        if preload:
            env["LD_PRELOAD"] = ":".join(dict.fromkeys(preload))
        else:
            env.pop("LD_PRELOAD", None)
        return env

    @property
    def log_dir(self) -> Path:
        return self.output_dir / LOGS_DIR

    def train_command(self, config_path: Path) -> list[str]:
        return [sys.executable, "-m", "amxtune_trainer", "launch",
                f"--nproc-per-node={self.ranks}", f"--log-dir={self.log_dir}", "--",
                TRAINER_COMMAND[self.spec.method], f"--config={config_path}"]

    def inference_task(self) -> dict:
        assert self.spec.export is not None
        export = self.spec.export
        pipeline = self.output_dir / "pipeline"
        lora = self.spec.method == Method.lora
        cache_dir = None
        if export.cache.enabled:
            # the output folder stands for the output claim; another claim is a folder as usual
            root = (self._claim_root(export.cache.claim_name) if export.cache.claim_name
                    else self.output_dir.parent)
            cache_dir = str(root / export.cache.path)
        fields = set(InferenceTask.model_fields) & set(type(export).model_fields) - {"cache"}
        return InferenceTask(
            **export.model_dump(include=fields),
            source_dir=str(self.output_dir),
            base_model=None if pipeline.is_dir() and (lora or not cache_dir) else self.model,
            revision=self.spec.model.revision,
            lora=LORA_FILE if lora and not pipeline.is_dir() else None,
            cache_dir=cache_dir,  # the inference command uses it for embeddings only
            output_dir=str(self.output_dir),
            concept_dir=str(self.data_dir),
        ).to_wire()


class ProgressBar:
    """One line on a terminal, plain lines otherwise, from the trainer's JSON progress."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last_plain = 0.0

    def update(self, record: TrainingProgress) -> None:
        step, total = record.step, max(1, record.max_steps)
        width = 30
        filled = int(width * step / total)
        loss = record.loss if record.loss is not None else float("nan")
        text = (f"{step}/{total} loss {loss:.4f} "
                f"{record.samples_per_second or 0:.2f} samples/s "
                f"eta {record.eta_seconds or 0:.0f}s")
        if self.tty:
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K")
            self.stream.flush()
        elif time.monotonic() - self.last_plain > 5 or step == total:
            self.last_plain = time.monotonic()
            print(f"training: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _run(command: list[str], env: dict[str, str], bar: ProgressBar | None) -> int:
    """Run one step; progress lines feed the bar, the started line becomes one sentence, other
    lines pass through. Ctrl-C stops it."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            record = None
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
            progress, started = TrainingProgress.read(record), TrainingStarted.read(record)
            # the training's and the export's completed lines both may carry similarities
            completed = TrainingCompleted.read(record) or ExportCompleted.read(record)
            scores = completed.concept_similarity if completed is not None else None
            if bar is not None and progress is not None:
                bar.update(progress)
            elif started is not None:
                print(f"amxtune run: training in {started.precision} "
                      f"({started.precision_reason}) on {started.cpu}",
                      file=sys.stderr, flush=True)
            elif isinstance(scores, dict):
                listed = ", ".join(f"{name} {value:.2f}" for name, value in scores.items())
                what = "the samples" if "images" in scores else "the concept prompt"
                print(f"amxtune run: concept similarity of {what} to the training images "
                      f"(0 to 1): {listed}", file=sys.stderr, flush=True)
                sys.stdout.write(line)
            else:
                if bar is not None and bar.tty:
                    bar.stream.write("\r\033[K")
                sys.stdout.write(line)
                sys.stdout.flush()
        return process.wait()
    except KeyboardInterrupt:
        _stop(process)
        raise
    finally:
        if bar is not None:
            bar.close()


def _stop(process: subprocess.Popen) -> None:
    """SIGINT to the launcher (it passes it to every rank), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def run_local(args: argparse.Namespace) -> int:
    plan = LocalPlan(args)
    layout = f" (ranksPerNode {plan.layout_reason})" if plan.layout_reason else ""
    print(f"amxtune run: {plan.job.name}: {plan.ranks} rank(s) x {plan.threads} thread(s)"
          f"{layout}, model {plan.model}, images {plan.data_dir}", file=sys.stderr)
    print(f"amxtune run: results in {plan.output_dir}", file=sys.stderr)
    env = plan.environment()
    with tempfile.TemporaryDirectory(prefix="amxtune-run-") as tmp:
        config_path = Path(tmp) / "trainer.json"
        config_path.write_text(json.dumps(plan.trainer_config(), indent=2))
        try:
            code = _run(plan.train_command(config_path), env, ProgressBar())
        except KeyboardInterrupt:
            print("amxtune run: stopped; run the same command again to resume from the last "
                  "checkpoint", file=sys.stderr)
            return 130
        if code != 0:
            logs = f"; tracebacks in {plan.log_dir}" if plan.log_dir.is_dir() else ""
            print(f"amxtune run: training failed (exit code {code}){logs}", file=sys.stderr)
            return code
        if plan.export:
            task_path = Path(tmp) / "inference.json"
            task_path.write_text(json.dumps(plan.inference_task(), indent=2))
            print("amxtune run: exporting to OpenVINO and rendering samples", file=sys.stderr)
            try:
                code = _run([sys.executable, "-m", "amxtune_trainer", "inference",
                             f"--config={task_path}"], env, None)
            except KeyboardInterrupt:
                return 130
            if code != 0:
                print(f"amxtune run: export failed (exit code {code})", file=sys.stderr)
                return code
    print(f"amxtune run: done; see {plan.output_dir}", file=sys.stderr)
    return 0
