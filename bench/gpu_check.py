"""One short check of the GPU path, for a lent GPU machine with a few minutes on it.

Parts, each in its own process (a crash, an out-of-memory or a hang in one leaves the
others running; GPU memory and DeepSpeed's process group are freed between them), each
with a time cap inside one overall budget:

1. ``env``: GPU, driver, CUDA, torch/transformers/deepspeed/peft/pydantic/torchvision
   versions and the file each is imported from (carried wheels must not shadow the
   machine's torch or transformers).
2. ``embed``: bench/bench_embed.py at Qwen2-VL-2B's shapes (random weights, bf16): the
   Embedder vs a plain transformers loop, samples/s, TFLOP/s, peak memory.
3. ``gradcache``: bench/bench_gradcache.py at the same shapes: the real stage-4 step under
   DeepSpeed ZeRO-2 bf16, GradCache vs one graph, ms/step and peak memory.
4. ``train``: stage 0 then stage 4 through their CLIs (``python -m mmemb.stages.prepare``,
   ``python -m mmemb.stages.train``) on the tiny model and the demo's synthetic data with
   oracle rationales: DeepSpeed ZeRO-2 bf16, steps/s, loss and hit@1 before/after.
5. ``tests``: ``pytest -m gpu tests/gpu tests/losses``.

Results go to ``$OUT`` (default ``./gpu_out``): ``gpu_check.json``, ``gpu_check.md`` (both
rewritten after every part, so a run cut short keeps what it measured) and ``logs/``.

    python bench/gpu_check.py                  # the GPU run (~4-5 min on an H100)
    python bench/gpu_check.py --quick          # CPU, small shapes: checks the script itself
    python bench/gpu_check.py --parts env,embed

Wheels the machine lacks are carried in ``.whl/`` and installed by the caller with
``pip install --target``; ``.whl/optional/`` (torchvision, which transformers' Qwen2-VL image
and video processors need) is installed here only when ``import torchvision`` fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "embed", "gradcache", "train", "tests")
# Per-part time caps (s) on the GPU; the overall budget cuts them further when late.
CAPS = {"env": 60, "embed": 110, "gradcache": 140, "train": 140, "tests": 160}
# Dense bf16 peak (TFLOP/s, no sparsity) by device name, for MFU; first match wins.
PEAK_BF16 = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
             ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0))

SMALL = ["--hidden", "128", "--layers", "2", "--heads", "2", "--kv-heads", "2",
         "--intermediate", "256", "--vocab", "151936", "--vision-depth", "1",
         "--vision-dim", "64", "--vision-heads", "2"]


def part_args(quick: bool) -> dict[str, list[str]]:
    """The bench flags: Qwen2-VL-2B's shapes in bf16 on the GPU, tiny ones on the CPU."""
    if quick:
        return {
            "embed": ["--device", "cpu", "--dtype", "float32", *SMALL, "--image-size", "112",
                      "--max-pixels", "12544", "--n", "8", "--batch", "4", "--repeats", "2",
                      "--count-flops"],
            "gradcache": ["--device", "cpu", *SMALL, "--batch", "8", "--chunk", "4",
                          "--steps", "2"],
        }
    return {
        # 224 px images: 256 patches -> 64 visual tokens, ~130 tokens per input.
        "embed": ["--device", "cuda", "--dtype", "bfloat16", "--preset", "qwen2vl-2b",
                  "--image-size", "224", "--max-pixels", "50176", "--n", "64", "--batch",
                  "16", "--repeats", "5", "--count-flops"],
        "gradcache": ["--device", "cuda", "--preset", "qwen2vl-2b", "--batch", "32",
                      "--chunk", "8", "--steps", "4"],
    }


# --------------------------------------------------------------------------- children
def child_env() -> dict:
    """What one process of the check reports about its environment."""
    import importlib

    import mmemb  # noqa: F401 - as the code under test does (CPU-torch torchvision shim)

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in ("torch", "transformers", "deepspeed", "peft", "pydantic", "torchvision",
                 "tokenizers", "pyarrow", "accelerate", "numpy"):
        try:
            m = importlib.import_module(name)
            info[name] = {"version": getattr(m, "__version__", "?"), "file": m.__file__}
        except Exception as e:  # noqa: BLE001 - report any import failure, keep going
            info[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_mem_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                    bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()[:300]
    try:
        from deepspeed.accelerator import get_accelerator

        info["ds_accelerator"] = get_accelerator()._name
    except Exception as e:  # noqa: BLE001
        info["ds_accelerator"] = f"error: {e}"[:300]
    # Carried wheels go in front of the machine's packages: torch and transformers must
    # still be the machine's own (CUDA build, tested version).
    site = os.environ.get("GPU_CHECK_CARRIED", "/tmp/site")
    info["shadowed"] = [n for n in ("torch", "transformers")
                        if isinstance(info.get(n), dict)
                        and str(info[n].get("file", "")).startswith(site)]
    for k, v in info.items():
        print(f"  {k}: {v}")
    return info


def child_bench(module: str, args: list[str]) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    import importlib

    return importlib.import_module(module).main(args)


def child_selections(pairs: str, out: str) -> dict:
    """Stage-3-like selections from pairs: oracle steps on inference rows (the LM term
    trains, ~40% of rows reason), none on the easy rows (direct mode)."""
    from data_contracts import io
    from data_contracts.schemas import SELECTIONS
    from mmemb.teachers.oracle import oracle_selections

    uri = oracle_selections(pairs, out)
    rows = io.read(uri, SELECTIONS).to_pylist()
    return {"rows": len(rows), "with_rationale": sum(r["rationale"] is not None for r in rows),
            "uri": str(uri)}


def run_child(a: argparse.Namespace) -> None:
    if a.child == "env":
        res = child_env()
    elif a.child == "selections":
        res = child_selections(*a.rest)
    else:
        res = child_bench(a.child, a.rest)
    Path(a.result).write_text(json.dumps(res, indent=2, default=str))


# --------------------------------------------------------------------------- parent
class Check:
    def __init__(self, out: Path, quick: bool, budget: float):
        self.out, self.quick, self.t0, self.budget = out, quick, time.monotonic(), budget
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # Scratch (tiny model, synthetic data, checkpoints) outside $OUT: none of it is
        # worth carrying back.
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.res: dict = {"mode": "quick (CPU, small shapes)" if quick else "gpu",
                          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TRANSFORMERS_VERBOSITY": "error",
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if quick else "8"),
                    "DS_ACCELERATOR": "cpu" if quick else "cuda",
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
        if quick:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
            self.env["MMEMB_GPU_TESTS_DEVICE"] = "cpu"

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def say(self, msg: str) -> None:
        print(f"[gpu_check {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.res, indent=2, default=str))
        try:
            md = markdown(self.res)
        except Exception as e:  # noqa: BLE001 - the JSON above still holds every number
            md = f"# GPU check\n\nsummary failed ({type(e).__name__}: {e}); see gpu_check.json\n"
        (self.out / "gpu_check.md").write_text(md)

    def run(self, name: str, cmd: list[str], cap: float, extra_env: dict | None = None
            ) -> dict:
        """Run one process with its output teed to logs/NAME.log and our stdout; kill its
        process group at the cap or at the end of the budget, whichever is first."""
        limit = max(5.0, min(cap, self.left()))
        log = self.logs / f"{name}.log"
        self.say(f"{name}: {' '.join(cmd)}  (limit {limit:.0f}s)")
        t = time.monotonic()
        with log.open("w") as f:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                 env={**self.env, **(extra_env or {})},
                                 start_new_session=True)
            shown = 0
            timed_out = False
            while p.poll() is None:
                time.sleep(0.5)
                shown = _tail(log, shown, name)
                if time.monotonic() - t > limit:
                    timed_out = True
                    os.killpg(p.pid, 9)
                    p.wait()
            _tail(log, shown, name)
        rc = p.returncode
        dt = time.monotonic() - t
        self.say(f"{name}: rc {rc}{' (timed out)' if timed_out else ''} in {dt:.1f}s")
        return {"rc": rc, "seconds": round(dt, 1), "timed_out": timed_out,
                "log": str(log.relative_to(self.out))}

    def child(self, name: str, kind: str, rest: list[str], cap: float,
              extra_env: dict | None = None) -> dict:
        result = self.logs / f"{name}.json"
        result.unlink(missing_ok=True)
        st = self.run(name, [sys.executable, str(Path(__file__)), "--child", kind,
                             "--result", str(result), "--", *rest], cap, extra_env)
        if result.is_file():
            st["result"] = json.loads(result.read_text())
        return st

    def part(self, name: str, fn) -> None:
        if self.left() < 10:
            self.res["parts"][name] = {"status": "skipped (budget spent)"}
            self.say(f"{name}: skipped, budget spent")
            self.save()
            return
        try:
            st = fn()
        except Exception as e:  # noqa: BLE001 - one broken part must not stop the rest
            st = {"error": f"{type(e).__name__}: {e}"}
        ok = st.get("rc", 1) == 0 and "error" not in st and not st.get("failed")
        st["status"] = "ok" if ok else "FAILED"
        if not ok and st.get("log"):
            st["log_tail"] = (self.out / st["log"]).read_text(errors="replace"
                                                               ).splitlines()[-25:]
        self.res["parts"][name] = st
        self.save()

    # ---- the parts
    def p_env(self) -> dict:
        return self.child("env", "env", [], CAPS["env"])

    def p_bench(self, name: str) -> dict:
        module = {"embed": "bench_embed", "gradcache": "bench_gradcache"}[name]
        st = self.child(name, module, part_args(self.quick)[name], CAPS[name])
        r = st.get("result") or {}
        env = self.res["parts"].get("env", {}).get("result", {})
        peak = next((v for k, v in PEAK_BF16 if k in str(env.get("gpu", ""))), None)
        if name == "embed" and peak and "embedder_tflops" in r and r.get("dtype") == "bfloat16":
            r["mfu_embedder"] = r["embedder_tflops"] / peak
            r["mfu_plain"] = r["plain_tflops"] / peak
            r["peak_bf16_tflops"] = peak
        return st

    def p_train(self) -> dict:
        w = self.work / "train"
        shutil.rmtree(w, ignore_errors=True)
        size, steps = ("smoke", 20) if self.quick else ("demo", 150)
        prep = self.run("train_prepare", [
            sys.executable, "-m", "mmemb.stages.prepare", "--source", "tiny", "--size", size,
            "--out", str(w / "data"), "--model-out", str(w / "base"), "--pretrain-steps",
            "0"], 60)
        if prep["rc"] != 0:
            return {**prep, "failed": "prepare"}
        sel = self.child("train_selections", "selections",
                         [str(w / "data" / "pairs"), str(w / "sel")], 30)
        if sel["rc"] != 0:
            return {**sel, "failed": "selections"}
        st = self.run("train", [
            sys.executable, "-m", "mmemb.stages.train", "--model", str(w / "base"),
            "--data", str(w / "sel"), "--eval", str(w / "data" / "eval"), "--image-root",
            str(w / "data"), "--out", str(w / "out"), "--steps", str(steps)], CAPS["train"])
        st["prepare_s"], st["selections"] = prep["seconds"], sel.get("result")
        summ = w / "out" / "train_summary.json"
        if summ.is_file():
            m = json.loads(summ.read_text())
            rows = [json.loads(x)[1] for x in (w / "out" / "steps.jsonl").read_text()
                    .splitlines()]
            dts = sorted(r["step_s"] for r in rows[1:]) or [float("nan")]  # step 1: warm-up
            ds = json.loads((w / "out" / "ds_config.json").read_text())
            st["result"] = {
                "steps": m.get("steps"), "train_s": m.get("train_s"),
                "median_step_s": dts[len(dts) // 2], "steps_per_s": 1 / dts[len(dts) // 2],
                "samples_per_s_median": sorted(r["samples_per_s"] for r in rows)[len(rows) // 2],
                "loss_first": m.get("loss_first"), "loss_last": m.get("loss_last"),
                "lm_first": rows[0]["loss/lm"], "lm_last": rows[-1]["loss/lm"],
                "eval_before_mean": m.get("eval_before/mean"), "eval_mean": m.get("eval/mean"),
                "params_changed": m.get("params_changed"),
                "params_trainable": m.get("params_trainable"),
                "bf16": ds["bf16"]["enabled"], "zero_stage": ds["zero_optimization"]["stage"],
                "batch": ds["train_micro_batch_size_per_gpu"]}
            if not (m.get("loss_last", 1e9) < m.get("loss_first", 0)):
                st["failed"] = "loss did not fall"
        return st

    def p_tests(self) -> dict:
        xml = self.logs / "tests.xml"
        xml.unlink(missing_ok=True)
        st = self.run("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu",
                                "tests/losses", "-q", "-p", "no:cacheprovider",
                                f"--junitxml={xml}"],
                      CAPS["tests"])
        if xml.is_file():
            root = ET.parse(xml).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            cases = []
            for c in suite.iter("testcase"):
                verdict = next((ch.tag for ch in c if ch.tag in ("failure", "error",
                                                                 "skipped")), "passed")
                cases.append({"test": c.get("name"), "result": verdict,
                              "seconds": float(c.get("time", 0))})
            st["result"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors",
                                                               "skipped")}
            st["result"]["cases"] = cases
            if not self.quick and st["result"]["skipped"]:
                st["failed"] = "tests skipped on the GPU machine"
        return st


def _tail(log: Path, shown: int, name: str) -> int:
    """Print the log's new complete lines (progress for the person watching)."""
    data = log.read_bytes()
    end = data.rfind(b"\n") + 1
    if end > shown:
        for line in data[shown:end].decode(errors="replace").splitlines():
            line = line.rsplit("\r", 1)[-1]
            if line.strip():
                print(f"  [{name}] {line}", flush=True)
        return end
    return shown


def _f(v, fmt=".1f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "n/a"


def markdown(res: dict) -> str:
    """The human summary: one table per part (n/a where a part did not produce it)."""
    P = res["parts"]
    L = [f"# GPU check ({res['mode']}), {res['started']}, {res.get('elapsed_s', 0):.0f} s",
         ""]
    L += ["| part | status | seconds |", "|---|---|---|"]
    L += [f"| {k} | {v.get('status')} | {_f(v.get('seconds'))} |" for k, v in P.items()]
    e = P.get("env", {}).get("result")
    if e:
        v = lambda n: (e.get(n) or {}).get("version", (e.get(n) or {}).get("error", "n/a"))
        L += ["", "## Environment", "",
              f"- GPU: {e.get('gpu', 'none')} x{e.get('gpu_count', 0)}, "
              f"{_f(e.get('gpu_mem_gib'))} GiB, capability {e.get('capability', 'n/a')}, "
              f"bf16 {e.get('bf16', 'n/a')}; nvidia-smi: {e.get('nvidia_smi', 'n/a')}",
              f"- Python {e.get('python')}, torch {v('torch')} (CUDA {e.get('torch_cuda')}), "
              f"transformers {v('transformers')}, DeepSpeed {v('deepspeed')} (accelerator "
              f"{e.get('ds_accelerator')}), peft {v('peft')}, pydantic {v('pydantic')}, "
              f"torchvision {v('torchvision')}",
              f"- torchvision: {res.get('torchvision', 'n/a')}; shadowed by carried wheels: "
              f"{e.get('shadowed') or 'none'}"]
    r = P.get("embed", {}).get("result")
    if r:
        L += ["", "## Embedding throughput (bench/bench_embed.py)", "",
              f"{_f(r.get('params', 0) / 1e6)} M params, {r.get('dtype')} on {r.get('device')}, "
              f"{_f(r.get('tokens_per_input'), '.0f')} tokens/input; max |embedder - plain| "
              f"{_f(r.get('max_abs_diff'), '.1e')}", "",
              "| | samples/s | tokens/s | TFLOP/s | MFU | peak MiB |", "|---|---|---|---|---|---|"]
        for k, lab in (("embedder", "Embedder (no LM head)"), ("plain", "plain loop (logits)")):
            L.append(f"| {lab} | {_f(r.get(f'{k}_samples_per_s'))} | "
                     f"{_f(r.get(f'{k}_tokens_per_s'), '.0f')} | {_f(r.get(f'{k}_tflops'))} | "
                     f"{_f(r.get(f'mfu_{k}'), '.1%')} | {_f(r.get(f'peak_mib_{k}'), '.0f')} |")
        L.append(f"\nratio embedder / plain: {_f(r.get('ratio'), '.2f')}x; weights "
                 f"{_f(r.get('weights_mib'), '.0f')} MiB; MFU vs "
                 f"{_f(r.get('peak_bf16_tflops'), '.0f')} TFLOP/s bf16 dense")
    r = P.get("gradcache", {}).get("result")
    if r:
        L += ["", "## Train step, GradCache vs one graph (bench/bench_gradcache.py)", "",
              f"{_f(r.get('params', 0) / 1e6)} M params, bf16 {r.get('bf16')}, ZeRO-2, "
              f"contrastive batch {r.get('batch')} (+1 hard negative), chunks of "
              f"{r.get('chunk')}", "",
              "| | ms/step | pairs/s | peak MiB | added by the step MiB |", "|---|---|---|---|---|"]
        for k in ("plain", "gradcache"):
            L.append(f"| {k} | {_f(r.get(f'{k}_s', 0) * 1000)} | "
                     f"{_f(r.get(f'{k}_pairs_per_s'))} | {_f(r.get(f'peak_mib_{k}'), '.0f')} | "
                     f"{_f(r.get(f'step_mib_{k}'), '.0f')} |")
        L.append(f"\ngradcache / plain time: {_f(r.get('ratio'), '.2f')}x")
    r = P.get("train", {}).get("result")
    if r:
        L += ["", "## Stage 4 on the tiny model (python -m mmemb.stages.train)", "",
              f"- {_f(r.get('steps'), '.0f')} steps, batch {r.get('batch')}, "
              f"ZeRO-{r.get('zero_stage')}, "
              f"bf16 {r.get('bf16')}: median {_f(r.get('median_step_s'), '.3f')} s/step = "
              f"{_f(r.get('steps_per_s'), '.2f')} steps/s "
              f"({_f(r.get('samples_per_s_median'))} samples/s), train {_f(r.get('train_s'))} s",
              f"- loss {_f(r.get('loss_first'), '.3f')} -> {_f(r.get('loss_last'), '.3f')}; "
              f"LM {_f(r.get('lm_first'), '.3f')} -> {_f(r.get('lm_last'), '.3f')}; "
              f"synthetic hit@1 {_f(r.get('eval_before_mean'), '.3f')} -> "
              f"{_f(r.get('eval_mean'), '.3f')}; params changed "
              f"{_f(r.get('params_changed'), '.0f')}/{_f(r.get('params_trainable'), '.0f')}"]
    r = P.get("tests", {}).get("result")
    if r:
        L += ["", "## pytest -m gpu tests/gpu tests/losses", "",
              f"{r['tests']} tests: {r['failures']} failed, {r['errors']} errors, "
              f"{r['skipped']} skipped", ""]
        L += [f"- {c['test']}: {c['result']} ({c['seconds']:.1f} s)" for c in r["cases"]]
    for k, v in P.items():
        if v.get("status") != "ok" and v.get("log_tail"):
            why = v.get("failed") or v.get("error") or f"rc {v.get('rc')}"
            L += ["", f"## {k}: {v.get('status')} ({why}"
                  f"{', timed out' if v.get('timed_out') else ''})",
                  "", "```", *v["log_tail"], "```"]
    return "\n".join(L) + "\n"


def ensure_torchvision(chk: Check) -> None:
    """transformers' Qwen2-VL image/video processors need torchvision: use the machine's,
    else install the carried wheel (same torch version and CUDA build) beside the others."""
    # Imported after mmemb, as the code under test does (its shim for CPU-only torch).
    probe = [sys.executable, "-c", "import mmemb, torchvision; print(torchvision.__version__, "
             "torchvision.__file__)"]
    p = subprocess.run(probe, capture_output=True, text=True, env=chk.env, cwd=ROOT)
    if p.returncode == 0:
        chk.res["torchvision"] = f"present: {p.stdout.strip()}"
        return
    wheels = sorted((ROOT / ".whl" / "optional").glob("torchvision-*.whl"))
    if not wheels:
        chk.res["torchvision"] = "missing, no carried wheel"
        return
    target = Path(os.environ.get("TMPDIR", "/tmp")) / "site_tv"
    q = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--target", str(target),
                        *map(str, wheels)], capture_output=True, text=True)
    env = {**chk.env, "PYTHONPATH": os.pathsep.join([str(target), chk.env["PYTHONPATH"]])}
    p = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode == 0:  # only then in front of everything the children import
        chk.env = env
        chk.res["torchvision"] = f"installed from {wheels[0].name}: {p.stdout.strip()}"
    else:
        err = (q.stderr + p.stderr).strip()[-400:]
        chk.res["torchvision"] = f"missing; carried wheel failed: {err}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU, small shapes (checks the "
                    "script on a machine without a GPU)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument("--budget", type=float, help="seconds for all parts (default 330 on the "
                    "GPU, 3000 with --quick)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        run_child(a)
        return
    if not a.quick:  # probed in a child: this process never holds a CUDA context
        p = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
        if p.stdout.strip() != "True":
            print("gpu_check: no CUDA device visible; nothing to measure here (`--quick` checks "
                  "the script on the CPU)", flush=True)
            return  # `make bench` runs every bench/*.py: not a failure on a CPU machine
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chk = Check(out, a.quick, a.budget or (3000.0 if a.quick else 330.0))
    if a.quick:  # CPU caps: the shared 2-core dev machine is ~20x slower than the GPU box
        CAPS.update({k: 600 for k in CAPS})
    chk.say(f"out {out}, budget {chk.budget:.0f}s, mode {chk.res['mode']}")
    ensure_torchvision(chk)
    chk.say(f"torchvision: {chk.res['torchvision']}")
    fns = {"env": chk.p_env, "embed": lambda: chk.p_bench("embed"),
           "gradcache": lambda: chk.p_bench("gradcache"), "train": chk.p_train,
           "tests": chk.p_tests}
    for name in a.parts.split(","):
        chk.part(name, fns[name])
    chk.save()
    chk.say("summary:\n" + (out / "gpu_check.md").read_text())
    shutil.rmtree(chk.work, ignore_errors=True)


if __name__ == "__main__":
    main()
