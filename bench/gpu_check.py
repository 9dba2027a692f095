"""The GPU check (docs/scale.md): the GPU paths in one run under a hard time budget, written as one table.

    bash bench/gpu_check.sh [--wheels DIR] [--out DIR] [--budget S] [--weights PATH] [--device cpu] ...

Every step is a subprocess (``retention edit``/``fit``/``study`` or a helper of this module) and a row of the
table, whether it passed, failed or was not started because the budget ran out; a step still running at the
deadline is stopped. Without ``--weights`` the models are random weights of SmolLM2-135M's exact shape and of
Llama-3.2-1B's (each with a byte-level BPE trained on the built-in corpus: the published tokenizers need the
hub); with it, those weights (a folder or GGUF of SmolLM2-135M) replace the random SmolLM2. ``--device cpu``
runs the same steps on the CPU with 2-layer, narrow models of those architectures: the check's own test.

Writes ``OUT/table.md``, ``OUT/table.json``, the run folders (``OUT/runs``, ``OUT/studies``), the models
(``OUT/models``), each step's log (``OUT/logs``) and the cache the steps share (``OUT/cache``, emptied first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MAIN, LARGE = "smollm2-135m", "llama-3.2-1b"
SHAPES = {
    MAIN: dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
               tie_word_embeddings=True, initializer_range=0.041666666666666664),
    LARGE: dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                tie_word_embeddings=True, initializer_range=0.02),
}
"""The published configurations (SmolLM2-135M: 134,515,008 parameters; Llama-3.2-1B: 1,235,814,400)."""
TINY = {
    MAIN: dict(hidden_size=96, intermediate_size=256, num_attention_heads=3, num_key_value_heads=1),
    LARGE: dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=1),
}
"""``--device cpu``: the architectures (their query-to-key/value head ratios, rope, tying) narrow, at 2 layers
with heads of 32 and a vocabulary of 1,024."""
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""SmolLM2's special tokens, at its ids (BOS 1, EOS 2)."""
STEPS = ("model", "edit-rome", "edit-memit", "edit-alphaedit", "fit-bf16", "fit-fsdp2", "fit-fsdp1",
         "fit-ddp", "study", "covariance", "edit-1b", "fit-1b")
RESERVE_S = 3.0
"""Kept back from the last step for writing the table."""
_REPORT = re.compile(r"(\d+) steps, (\d+) trained tokens in ([\d.]+) s")


# -- helpers run as subprocesses ---------------------------------------------------------------------------


def make_model(shape: str, folder: Path, device: str, tiny: bool) -> dict:
    """A random-weight model of ``shape`` (seeded) and its tokenizer, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from retention.prose import builtin_prose

    t0 = time.perf_counter()
    sizes = dict(SHAPES[shape])
    if tiny:
        sizes.update(TINY[shape], num_hidden_layers=2, head_dim=32, vocab_size=1024)
    config = LlamaConfig(**sizes, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(builtin_prose().split("\n\n"), trainers.BpeTrainer(
        vocab_size=min(8192, config.vocab_size), special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=SPECIAL[1], eos_token=SPECIAL[2],
                                        pad_token=SPECIAL[2], unk_token=SPECIAL[0])
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds for 1B weights on a GPU
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {f"{shape} parameters": f"{sum(p.numel() for p in model.parameters()):,}",
            f"{shape} s": round(time.perf_counter() - t0, 1)}


def covariance_pass(model_name: str, device: str, samples: int, length: int, layers: list[int]) -> dict:
    """Key statistics of ``layers`` over ``samples`` windows of ``length`` tokens of the built-in corpus."""
    import torch

    from retention.editing.covariance import CovarianceSpec, key_covariances
    from retention.models import load_model

    model, tokenizer = load_model(model_name, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    # Any fingerprint: nothing is cached (the pass is what is timed) and the weights are not hashed.
    spec = CovarianceSpec("builtin", samples, length)
    key_covariances(model, tokenizer, layers, spec, fingerprint="gpu-check", cache=False)
    sync()
    seconds = time.perf_counter() - t0
    return {"tokens": samples * length, "layers": len(layers), "s": round(seconds, 1),
            "tokens/s": round(samples * length / seconds)}


# -- the steps -----------------------------------------------------------------------------------------------


@dataclass
class Row:
    step: str
    what: str
    status: str = "skipped"
    """ok, failed or skipped (not started: the budget ran out)."""
    seconds: float = 0.0
    results: dict = field(default_factory=dict)
    error: str = ""


class Check:
    """The steps of one check: their commands, how each reads its results, and the run under the budget."""

    def __init__(self, args: argparse.Namespace, start: float):
        self.args, self.out, self.cpu = args, Path(args.out).resolve(), args.device == "cpu"
        self.deadline = start + args.budget
        self.py = sys.executable
        self.real = args.weights is not None
        self.models = self.out / "models"
        self.main = str(Path(args.weights).resolve()) if self.real else str(self.models / MAIN)
        self.large = str(self.models / LARGE)
        self.devices = 2 if self.cpu else _gpu_count()
        self.jobs = args.jobs or self.devices
        self.seeds = max(1, self.devices // 2)
        """Seeds of the study's 2 arms: a run per device."""
        large = {"edit-1b", "fit-1b"} & set(args.steps)
        self.shapes = ([] if self.real else [MAIN]) + ([LARGE] if large else [])
        """The random models to make."""
        self.n_edit = 4 if self.cpu else 10
        self.fit_steps = 4 if self.cpu else 60
        self.accelerator = "cpu" if self.cpu else "gpu"
        # The SmolLM2 presets; on the CPU's 2-layer models, their layers and short optimisations.
        self.tiny_hp = {"v_steps": 5, "context_templates": [[5, 1]], "mom2_samples": 20,
                        "mom2_max_length": 32, "mom2_corpus": "builtin"}

    # commands

    def edit(self, step: str, editor: str, model: str, mode: str) -> list[str]:
        override = ({**self.tiny_hp, **({"layer": 1} if editor == "rome" else {"layers": [0, 1]})} if self.cpu
                    else {"mom2_corpus": "builtin"})  # the ROME preset names wikitext2, which a host may lack
        return [self.py, "-m", "retention", "edit", "--model", model, "--editor", editor, "--hparams", MAIN,
                "--set", json.dumps(override), "--mode", mode, "--n", str(self.n_edit),
                "--select_known", "top1" if self.real and model == self.main else "none",
                "--device", "cpu" if self.cpu else "cuda", "--save_model", "false",
                "--out", str(self.out / "runs" / step)]

    def fit(self, name: str, model: str, trainer: str | None, steps: int, edits: bool,
            extra: tuple[str, ...] | list[str] = ()) -> list[str]:
        config = {
            "model": {"model_name": model},
            "trainer": {"max_steps": steps, "enable_progress_bar": False},
            "run": {"out_dir": str(self.out / "runs"), "name": name, "overwrite": True, "wandb": "disabled",
                    "checkpoint_every": 0},
            "monitor": {"every_n_steps": max(1, steps // 2)},
            "edits": self.fit_edits(model) if edits else {"n_edit": 0, "n_control": 0},
        }
        if trainer is None:
            config["trainer"].update(accelerator=self.accelerator, devices=1, precision="bf16-mixed")
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
        layered = ["--config", str(CONFIGS / "trainer" / trainer)] if trainer else []
        return [self.py, "-m", "retention", "fit", "--config", str(CONFIGS / "demo.yaml"), *layered,
                "--config", str(path), *extra]

    def fit_edits(self, model: str) -> dict:
        known = "top1" if self.real and model == self.main else "none"
        if self.cpu:
            return {"known_protocol": known, "n_edit": 3, "n_control": 3, "max_candidates": 20,
                    "hparams": {**self.tiny_hp, "layers": [0, 1]}}
        return {"known_protocol": known, "hparams": MAIN}

    def study(self) -> list[str]:
        name = "gpu_check"
        sets = {f"edits.{k}": v for k, v in self.fit_edits(self.main).items()}
        sets.update({"model.model_name": self.main, "run.wandb": "disabled", "run.checkpoint_every": 0,
                     "trainer.accelerator": self.accelerator, "trainer.devices": 1,
                     "trainer.precision": "bf16-mixed", "trainer.max_steps": self.fit_steps // 2,
                     "trainer.enable_progress_bar": False,
                     "monitor.every_n_steps": max(1, self.fit_steps // 4)})
        study = {"name": name, "base": str(CONFIGS / "demo.yaml"), "out_dir": str(self.out / "studies"),
                 "set": sets, "arms": {"baseline": {}, "freeze_edited": {"freeze.policy": "edited"}},
                 "seeds": list(range(self.seeds))}
        path = self.out / "configs" / "study.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(study, indent=1), encoding="utf-8")
        # A fresh study, not the resumption of an earlier check's.
        shutil.rmtree(self.out / "studies" / name, ignore_errors=True)
        return [self.py, "-m", "retention", "study", "--config", str(path), "--jobs", str(self.jobs)]

    def helper(self, *argv: str) -> list[str]:
        return [self.py, "-m", "bench.gpu_check", "--out", str(self.out), *argv]

    def plan(self) -> list[tuple[str, str, Callable[[], list[str]] | None, Callable[[str, str], dict]]]:
        """Every step in order: ``(name, what, its command (built when it starts; None: it cannot run here),
        its results reader)``."""
        dev = "cpu" if self.cpu else "cuda"
        one = "1 CPU process" if self.cpu else "1 GPU"
        half = self.fit_steps // 2
        layers = ["0", "1"] if self.cpu else ["3", "4", "5", "6", "7"]
        samples, length = ("20", "32") if self.cpu else ("1000", "128")
        single = ["--trainer.devices", "1", "--trainer.strategy.init_args.data_parallel_size", "1"]
        ddp = "ddp_cpu.yaml" if self.cpu else "ddp_gpu.yaml"
        fsdp2 = "fsdp2_cpu.yaml" if self.cpu else "fsdp2_gpu.yaml"
        n = self.n_edit
        return [
            ("model", f"random weights of {' and '.join(self.shapes)}" + (", 2 narrow layers" * self.cpu),
             lambda: self.helper("--make-model", *self.shapes, "--device", dev, *(["--tiny"] * self.cpu)),
             _json_line),
            ("edit-rome", f"retention edit: ROME, {n} facts one after another, on {one}",
             lambda: self.edit("edit-rome", "rome", self.main, "sequential"), self.edit_results),
            ("edit-memit", f"retention edit: MEMIT, a batch of {n}",
             lambda: self.edit("edit-memit", "memit", self.main, "batch"), self.edit_results),
            ("edit-alphaedit", f"retention edit: AlphaEdit, a batch of {n}",
             lambda: self.edit("edit-alphaedit", "alphaedit", self.main, "batch"), self.edit_results),
            ("fit-bf16", f"retention fit: the demo (an AlphaEdit batch), bf16-mixed, {one}, "
                         f"{self.fit_steps} steps",
             lambda: self.fit("fit-bf16", self.main, None, self.fit_steps, True), self.fit_results),
            ("fit-fsdp2", f"the same under FSDP2 on {one}, {half} steps",
             lambda: self.fit("fit-fsdp2", self.main, fsdp2, half, True, single), self.fit_results),
            # FSDP1 runs plain fine-tuning: the retention monitor refuses it (docs/finetuning.md, strategies).
            ("fit-fsdp1", f"plain fine-tuning under FSDP1 on {one}, {half} steps",
             None if self.cpu else lambda: self.fit("fit-fsdp1", self.main, "fsdp_gpu.yaml", half, False,
                                                    ["--trainer.devices", "1"]), self.fit_results),
            ("fit-ddp", f"the same as fit-bf16 under DDP on {self.devices} "
                        f"{'CPU processes' if self.cpu else 'GPU(s)'}, {half} steps",
             lambda: self.fit("fit-ddp", self.main, ddp, half, True), self.fit_results),
            ("study", f"retention study --jobs {self.jobs}: 2 arms x {self.seeds} seed(s), {half} steps each",
             self.study, self.study_results),
            ("covariance", f"key statistics of {len(layers)} layers over {samples} x {length} tokens",
             lambda: self.helper("--covariance", self.main, "--device", dev, "--samples", samples, "--length",
                                 length, "--layers", *layers), _json_line),
            ("edit-1b", f"retention edit: MEMIT, a batch of {n}, at {LARGE}'s shape",
             lambda: self.edit("edit-1b", "memit", self.large, "batch"), self.edit_results),
            ("fit-1b", f"plain fine-tuning in bf16-mixed at {LARGE}'s shape, {half} steps",
             lambda: self.fit("fit-1b", self.large, None, half, False), self.fit_results),
        ]

    # results

    def edit_results(self, step: str, log: str) -> dict:
        scores = json.loads((self.out / "runs" / step / "scores.json").read_text())
        landed = scores["edited"]["edit"]["prob"]
        return {"edits": scores["n_edits"], "s/edit": round(scores["seconds_per_edit"], 2),
                "landed (prob)": f"{landed['count']}/{landed['denominator']}"}

    def fit_results(self, step: str, log: str) -> dict:
        out = {}
        m = _REPORT.search(log)
        if m:
            out["tokens/s per rank"] = round(int(m.group(2)) / float(m.group(3)))
        summary = self.out / "runs" / step / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            if s["run"].get("reused", {}).get("edit"):
                out["edit"] = "reused from the cache"
            elif "edit_s" in s["timings"]:
                out["edit s"] = round(s["timings"]["edit_s"], 1)
            for p, groups in s["retention"].items():
                if "edit" in groups:
                    e, i = groups["edit"], groups.get("control", {"count": 0, "denominator": 0})
                    out[f"{p} retention"] = (f"E {e['count']}/{e['denominator']}, "
                                             f"I {i['count']}/{i['denominator']}")
        return out

    def study_results(self, step: str, log: str) -> dict:
        state = json.loads((self.out / "studies" / "gpu_check" / "study.json").read_text())
        done = sum(r["state"] == "done" for r in state["runs"])
        return {"runs done": f"{done}/{len(state['runs'])}", "jobs": self.jobs}

    # the run

    def run(self) -> list[Row]:
        # Every check computes what it times (key statistics, edits) afresh.
        shutil.rmtree(self.out / "cache", ignore_errors=True)
        rows = []
        for step, what, build, results in self.plan():
            if step not in self.args.steps or (step == "model" and not self.shapes):
                continue
            row = Row(step, what)
            rows.append(row)
            left = self.deadline - time.monotonic() - RESERVE_S
            if build is None:
                row.error = "FSDP1 runs on GPUs only"
            elif left < 1:
                row.error = "not started: the time budget ran out"
            else:
                command = build()
                if step in self.args.fail:
                    command = [*command, "--no_such_option"]  # a forced failure (--fail), like any other
                print(f"--- {step}: {what} ({left:.0f} s left)", flush=True)
                self.execute(row, command, left, results)
            print(f"    {row.status}: {row.error or row.results}", flush=True)
        return rows

    def execute(self, row: Row, command: list[str], timeout: float,
                results: Callable[[str, str], dict]) -> None:
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{row.step}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RETENTION_CACHE": str(self.out / "cache")}
        t0 = time.monotonic()
        with open(log_path, "w", encoding="utf-8") as log:
            # A session of its own: a step stopped at the deadline takes its children (ranks, jobs) with it.
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
        row.seconds = round(time.monotonic() - t0, 1)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        if code is None:
            row.status, row.error = "failed", f"stopped at the time budget after {row.seconds:.0f} s"
            return
        if code != 0:
            row.status, row.error = "failed", f"exit {code}: {_last_error(text)}"
            return
        try:
            row.results = results(row.step, text)
        except (OSError, KeyError, ValueError) as err:
            row.status, row.error = "failed", f"its results are unreadable: {type(err).__name__}: {err}"
            return
        row.status = "ok"


def _json_line(step: str, log: str) -> dict:
    return json.loads([line for line in log.splitlines() if line.startswith("{")][-1])


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|Error|Exception|Killed|Traceback", line)]
    return (errors or lines or ["no output"])[-1][:300]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _header(check: Check, seconds: float) -> dict:
    from importlib.metadata import version

    if check.cpu:
        device = f"CPU ({os.cpu_count()} cores)"
    else:
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device = f"{len(names)} x {names[0]}" if names else "no GPU"
    return {"date": datetime.date.today().isoformat(), "device": device, "python": sys.version.split()[0],
            **{name: version(name) for name in ("torch", "transformers", "lightning", "peft")},
            "weights": check.args.weights or "random", "budget_s": check.args.budget,
            "total_s": round(seconds, 1)}


def write_table(check: Check, rows: list[Row], seconds: float) -> str:
    head = _header(check, seconds)
    lines = [f"GPU check on {head['device']}, {head['date']}: torch {head['torch']}, transformers "
             f"{head['transformers']}, lightning {head['lightning']}, peft {head['peft']}, Python "
             f"{head['python']}; weights: {head['weights']}; {head['total_s']:.0f} s of a "
             f"{head['budget_s']:.0f} s budget", "",
             "| step | what | status | s | results |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = r.error or "; ".join(f"{k} {v}" for k, v in r.results.items())
        lines.append(f"| {r.step} | {r.what} | {r.status} | {r.seconds:.0f} | {cells.replace('|', '/')} |")
    table = "\n".join(lines) + "\n"
    check.out.mkdir(parents=True, exist_ok=True)
    (check.out / "table.md").write_text(table, encoding="utf-8")
    data = {**head, "rows": [r.__dict__ for r in rows]}
    (check.out / "table.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"),
                   help="output folder (default runs/gpu_check)")
    p.add_argument("--budget", type=float, default=480.0, help="hard limit on the whole check, seconds (480)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda, or cpu: the same steps with 2-layer, narrow models")
    p.add_argument("--weights", help="SmolLM2-135M's weights (a folder or .gguf) instead of random ones")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                   help="the steps to run (default all)")
    p.add_argument("--fail", nargs="+", choices=STEPS, default=[],
                   help="make these steps fail (tests the table)")
    p.add_argument("--jobs", type=int, help="the study's --jobs (default: one per device)")
    # the helpers that steps run as subprocesses
    p.add_argument("--make-model", nargs="+", metavar="SHAPE", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--covariance", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--layers", nargs="+", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.make_model is not None or args.covariance is not None:
        models = Path(args.out).resolve() / "models"
        if args.covariance is not None:
            info = covariance_pass(args.covariance, args.device, args.samples, args.length, args.layers)
        else:
            info = {}
            for shape in args.make_model:
                info.update(make_model(shape, models / shape, args.device, args.tiny))
        print(json.dumps(info))
        return 0
    t0 = time.monotonic()
    check = Check(args, t0)
    rows = check.run()
    print("\n" + write_table(check, rows, time.monotonic() - t0))
    print(f"table and runs: {check.out}")
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
