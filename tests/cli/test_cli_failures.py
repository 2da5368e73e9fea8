"""The command line under hostile input and faults, run as a user would (subprocesses): one-line
errors with exit code 2 naming the file or argument, --debug for tracebacks, locks, damaged
files, strict JSON, SoftCPT eval, caches from other weights, shots from the cache, progress lines
off a terminal, and the default model rebuilt by another process (issue 14, items 5, 7, 10-13,
18-21)."""
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from fastprompt.data import build_or_load_cache, load_dataset, make_shapes_dataset
from fastprompt.data.tasks import make_shapes_tasks, read_tasks_file
from fastprompt.models import create_model
from fastprompt.train import Task, TrainConfig, train_run, train_softcpt_run
from fastprompt.train.files import run_lock


def fastprompt(*args, limit_file_size=None, check_rc=None):
    def limits():
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))
    proc = subprocess.run([sys.executable, "-m", "fastprompt", *map(str, args)],
                          capture_output=True, text=True, preexec_fn=limits, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def one_line_error(proc, command, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"fastprompt {command}")]
    assert len(lines) == 1 and lines[0].startswith(f"fastprompt {command}: error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def strict_json(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_weights):
    """Shapes data, the tiny weights file, a cache of it and a 2-epoch run trained on it."""
    root = tmp_path_factory.mktemp("cli_failures")
    splits = make_shapes_dataset(root / "shapes", num_classes=3, images_per_class=4,
                                 test_images_per_class=2, seed=9, size=32)
    model, pt, pv, tok = create_model("fastprompt-tiny", tiny_weights)
    cache = build_or_load_cache(root / "cache.safetensors", model, "fastprompt-tiny", pt, pv,
                                splits, views=2, seed=1, progress=False)
    cfg = TrainConfig(pretrained=tiny_weights, epochs=2, batch_size=8, n_ctx=4)
    train_run(cfg, cache, model, tok, root / "run", progress=False)
    return root, tiny_weights, model, tok, cache


def test_locked_run_folder_names_the_holder(world, tmp_path):
    root, weights, *_ = world
    run = tmp_path / "run"
    with run_lock(str(run)):
        proc = fastprompt("train", "--pretrained", weights, "--cache", root / "cache.safetensors",
                          "--out", run, "--epochs", "1", "--no-progress")
    one_line_error(proc, "train", f"pid {os.getpid()}", "in use")
    assert not (run / "config.json").exists()


def test_damaged_prompt_refused_by_eval_and_export(world, tmp_path):
    root, *_ = world
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    from safetensors import safe_open
    with safe_open(str(run / "prompt.safetensors"), "pt") as f:
        raw = f.get_tensor("ctx").numpy().tobytes()
    data = bytearray((run / "prompt.safetensors").read_bytes())
    data[data.find(raw) + 5] ^= 0x10
    (run / "prompt.safetensors").write_bytes(bytes(data))
    one_line_error(fastprompt("eval", run), "eval", "prompt.safetensors", "damaged")
    one_line_error(fastprompt("export", run, tmp_path / "out"), "export", "prompt.safetensors",
                   "damaged")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_export_with_an_unknown_opset_is_one_line(world, tmp_path):
    root, *_ = world
    one_line_error(fastprompt("export", root / "run", tmp_path / "out", "--opset", "999"),
                   "export", "opset", "999")
    assert not (tmp_path / "out").exists()


def test_metrics_json_problems_name_the_file(world, tmp_path):
    root, *_ = world
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / "metrics.json").write_text("{}")
    one_line_error(fastprompt("eval", run), "eval", "metrics.json", "--cache")
    (run / "metrics.json").write_text('{"cache": {"path": "/x')
    one_line_error(fastprompt("eval", run), "eval", "metrics.json", "not valid JSON")
    # With --cache, metrics.json is not needed.
    out = fastprompt("eval", run, "--cache", root / "cache.safetensors", "--json", check_rc=0)
    assert strict_json(out.stdout)["val_acc"] is None   # no validation split: null, not NaN


def test_eval_json_is_strict_and_matches_the_run(world):
    root, *_ = world
    out = fastprompt("eval", root / "run", "--json", check_rc=0)
    result = strict_json(out.stdout)
    assert result["test_acc"] == strict_json((root / "run" / "metrics.json").read_text())["test_acc"]
    for name in ("config.json", "metrics.json"):
        strict_json((root / "run" / name).read_text())


def test_nested_split_file_and_bad_device(world, tmp_path):
    root, weights, *_ = world
    nested = tmp_path / "split_zhou_Deep.json"
    nested.write_text("[" * 200000 + "]" * 200000)
    base = ["train", "--pretrained", weights, "--out", tmp_path / "r", "--no-progress"]
    # The split file lies in --data (one outside it is refused: issue 23, item 15).
    one_line_error(fastprompt(*base, "--data", tmp_path, "--split-file", nested),
                   "train", "split_zhou_Deep.json", "not valid JSON")
    one_line_error(fastprompt(*base, "--data", root / "shapes", "--device", "tpu9"), "train",
                   "--device", "tpu9")
    if not torch.cuda.is_available():
        one_line_error(fastprompt(*base, "--data", root / "shapes", "--device", "cuda"), "train",
                       "--device", "no CUDA GPU")
    one_line_error(fastprompt("eval", root / "run", "--device", "tpu9"), "eval", "--device")
    assert not (tmp_path / "r").exists()


def test_file_size_limit_and_unwritable_output(world, tmp_path):
    root, weights, *_ = world
    proc = fastprompt("cache", "--pretrained", weights, "--data", root / "shapes", "--views", "1",
                      "--out", tmp_path / "c.safetensors", limit_file_size=2000)
    one_line_error(proc, "cache", "File too large")
    assert [p for p in os.listdir(tmp_path) if "c.safetensors" in p] == []  # no temporaries
    (tmp_path / "file").write_text("not a folder")
    proc = fastprompt("cache", "--pretrained", weights, "--data", root / "shapes", "--views", "1",
                      "--out", tmp_path / "file" / "c.safetensors")
    one_line_error(proc, "cache", str(tmp_path / "file"))


@pytest.mark.parametrize("limit", [600, 3000])
def test_a_full_disk_during_train_names_the_file(world, tmp_path, limit):
    """A write that fails for lack of space (here a file-size limit: EFBIG, as ENOSPC) names the
    file it was writing, and leaves no temporary file (issue 23, item 12)."""
    root, weights, *_ = world
    run = tmp_path / "r"
    proc = fastprompt("train", "--pretrained", weights, "--cache", root / "cache.safetensors",
                      "--out", run, "--epochs", "1", "--batch-size", "8", "--n-ctx", "4",
                      "--no-progress", limit_file_size=limit)
    line = one_line_error(proc, "train", "File too large: ")
    written = line.rsplit("File too large: ", 1)[1]
    assert os.path.dirname(written) == str(run) and not os.path.basename(written).startswith(".")
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--momentum", "inf"),
                                         ("--weight-decay", "nan"), ("--smoothing", "-inf")])
def test_non_finite_hyper_parameters_are_refused(world, tmp_path, flag, value):
    root, weights, *_ = world
    proc = fastprompt("train", "--pretrained", weights, "--cache", root / "cache.safetensors",
                      "--out", tmp_path / "r", "--no-progress", f"{flag}={value}")
    name = flag[2:].replace("-", "_")
    one_line_error(proc, "train", f"{name}: must be a finite number")
    assert not (tmp_path / "r").exists()


def test_unexpected_error_is_one_line_with_a_debug_hint(monkeypatch, capsys):
    from fastprompt import cli
    from fastprompt.cli import evaluate

    def broken(args):
        raise RuntimeError("something nobody anticipated")
    monkeypatch.setattr(evaluate, "cmd_eval", broken)
    assert cli.main(["eval", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["fastprompt eval: unexpected error: RuntimeError: "
                                        "something nobody anticipated (rerun with --debug for "
                                        "the traceback)"]
    for argv in (["--debug", "eval", "somewhere"], ["eval", "somewhere", "--debug"]):
        with pytest.raises(RuntimeError, match="nobody anticipated"):
            cli.main(argv)


@pytest.fixture(scope="module")
def softcpt_run(world, tmp_path_factory):
    root, weights, model, tok, _ = world
    base = tmp_path_factory.mktemp("softcpt_eval")
    tasks_file = make_shapes_tasks(base / "tasks", num_tasks=2, classes_per_task=2,
                                   images_per_class=3, test_images_per_class=2, size=32, seed=4)
    _, pt, pv, _ = create_model("fastprompt-tiny", weights)
    tasks = []
    for i, spec in enumerate(read_tasks_file(tasks_file)):
        cache = build_or_load_cache(base / f"c{i}.safetensors", model, "fastprompt-tiny", pt, pv,
                                    load_dataset(spec.data), views=1, seed=1, progress=False)
        tasks.append(Task(spec.name, cache))
    metrics = train_softcpt_run(TrainConfig(learner="softcpt", pretrained=weights, epochs=1,
                                            batch_size=8, n_ctx=4), tasks, model, tok,
                                base / "run", progress=False)
    return base, metrics


def test_eval_softcpt_run_every_task_or_one(softcpt_run):
    base, metrics = softcpt_run
    result = strict_json(fastprompt("eval", base / "run", "--json", check_rc=0).stdout)
    assert [t["name"] for t in result["tasks"]] == ["shapes a", "shapes b"]
    assert [t["test_acc"] for t in result["tasks"]] == [t["test_acc"] for t in metrics["tasks"]]
    assert result["test_acc"] == pytest.approx(metrics["test_acc"])
    text = fastprompt("eval", base / "run", check_rc=0).stdout
    assert "shapes a: test accuracy" in text and "average test accuracy" in text
    one = strict_json(fastprompt("eval", base / "run", "--task", "Shapes_B", "--json",
                                 check_rc=0).stdout)
    assert [t["name"] for t in one["tasks"]] == ["shapes b"]
    one_line_error(fastprompt("eval", base / "run", "--cache", base / "c0.safetensors"), "eval",
                   "--task")
    ok = strict_json(fastprompt("eval", base / "run", "--cache", base / "c0.safetensors",
                                "--task", "shapes a", "--json", check_rc=0).stdout)
    assert ok["tasks"][0]["test_acc"] == metrics["tasks"][0]["test_acc"]
    one_line_error(fastprompt("eval", base / "run", "--task", "nope"), "eval", "no task 'nope'")


@pytest.fixture(scope="module")
def other_weights(world, tmp_path_factory):
    """A checkpoint of fastprompt-tiny with other weights."""
    from safetensors.torch import save_file
    _, _, model, _, _ = world
    g = torch.Generator().manual_seed(7)
    state = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("other") / "other.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_cache_of_other_weights_is_refused(world, other_weights, tmp_path):
    root, *_ = world
    cache = tmp_path / "c.safetensors"
    shutil.copy(root / "cache.safetensors", cache)
    before = cache.read_bytes()
    one_line_error(fastprompt("train", "--pretrained", other_weights, "--cache", cache, "--out",
                              tmp_path / "r", "--no-progress"), "train", "other weights")
    one_line_error(fastprompt("train", "--pretrained", other_weights, "--cache", cache, "--data",
                              root / "shapes", "--views", "2", "--out", tmp_path / "r",
                              "--no-progress"), "train", "--rebuild-cache")
    assert cache.read_bytes() == before and not (tmp_path / "r").exists()
    proc = fastprompt("train", "--pretrained", other_weights, "--cache", cache, "--data",
                      root / "shapes", "--views", "2", "--out", tmp_path / "r", "--epochs", "1",
                      "--no-progress", "--rebuild-cache", check_rc=0)
    assert "rebuilding the feature cache" in proc.stderr   # the warning reaches the user
    assert cache.read_bytes() != before


def test_epochs_follow_the_caches_shots(world, tmp_path):
    root, weights, model, _, _ = world
    _, pt, pv, _ = create_model("fastprompt-tiny", weights)
    one_shot = tmp_path / "one_shot.safetensors"
    build_or_load_cache(one_shot, model, "fastprompt-tiny", pt, pv, load_dataset(root / "shapes"),
                        views=1, shots=1, seed=1, progress=False)
    fastprompt("train", "--pretrained", weights, "--cache", one_shot, "--out", tmp_path / "r",
               "--n-ctx", "2", "--no-progress", check_rc=0)
    config = strict_json((tmp_path / "r" / "config.json").read_text())
    assert config["epochs"] == 50   # CoOp's count for 1 shot, not 200
    one_line_error(fastprompt("train", "--pretrained", weights, "--cache", one_shot, "--shots",
                              "4", "--out", tmp_path / "r2", "--no-progress"), "train",
                   "--shots", "holds 1 shots")


def test_cache_prints_classes_and_progress_lines_off_a_terminal(world, tmp_path):
    root, weights, *_ = world
    proc = fastprompt("cache", "--pretrained", weights, "--data", root / "shapes", "--views", "1",
                      "--out", tmp_path / "c.safetensors", check_rc=0)
    assert "fastprompt: 3 classes: 'blue triangle', 'green square', 'red circle'" in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("caching features:")]
    assert lines[0].startswith("caching features: 0/18 img")
    assert lines[-1].startswith("caching features: 18/18 img (100%)")
    assert "\r" not in proc.stderr


def test_default_model_run_exports_from_another_process(world, tmp_path):
    """fastprompt-tiny without --pretrained is the same seeded draw in every process, so a run
    trained in one process exports in another."""
    root, *_ = world
    run = tmp_path / "run"
    fastprompt("train", "--data", root / "shapes", "--views", "1", "--epochs", "1", "--n-ctx", "2",
               "--out", run, "--no-progress", check_rc=0)
    out = fastprompt("export", run, tmp_path / "onnx", "--head-only", check_rc=0)
    assert "passed" in out.stdout


def test_predict_on_a_decompression_bomb_is_one_line(world, tmp_path):
    from PIL import Image
    root, *_ = world
    fastprompt("export", root / "run", tmp_path / "onnx", check_rc=0)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)   # 4e8 pixels in a 50 kB file
    one_line_error(fastprompt("predict", tmp_path / "onnx", bomb), "predict",
                   "decompression bomb")


def test_every_json_file_written_is_strict(world, softcpt_run):
    """Every JSON file the package wrote in these tests (run configs and metrics of both
    learners, generated data and task sets with their markers) parses with a strict parser."""
    files = []
    for base in (world[0], softcpt_run[0]):
        for folder, _, names in os.walk(base):
            files += [os.path.join(folder, n) for n in names if n.endswith(".json")]
    names = {os.path.basename(f) for f in files}
    assert {"config.json", "metrics.json", "tasks.json"} <= names and len(files) >= 6
    for f in files:
        with open(f, encoding="utf-8") as fh:
            strict_json(fh.read())


@pytest.mark.parametrize("flag, value, low", [("--cache-chunk", "0", 1),
                                              ("--batch-size-cache", "x", 1),
                                              ("--workers", "-1", 0)])
def test_cache_sizes_are_refused_by_their_flag(tmp_path, capsys, flag, value, low):
    """The cache build's sizes are named by their flags, not by the library's parameter names
    (batch_size, chunk_size, num_workers)."""
    from fastprompt.cli import main
    with pytest.raises(SystemExit) as e:
        main(["cache", "--data", str(tmp_path), "--out", str(tmp_path / "c.safetensors"),
              f"{flag}={value}"])
    assert e.value.code == 2
    assert (f"fastprompt cache: error: argument {flag}: expected an int >= {low}, got {value!r}"
            in capsys.readouterr().err)
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("names, fragments", [
    ("dog\n\ncat\u202egnp.exe\n", ["line 3", "U+202E RIGHT-TO-LEFT OVERRIDE"]),
    ("\ufeffdog\ncat\x1b[2J\n", ["line 2", "U+001B"]),
    ("dog\nCat\ncat\n", ["classes 2 and 3, 'Cat' and 'cat'", "same to the tokenizer"]),
    ("dog\n" + "very " * 2000 + "\n", ["class 2 of 2, 'very very", "(9999 characters)",
                                       "context length 77"]),
])
def test_export_classnames_are_checked_as_class_folders_are(world, tmp_path, names, fragments):
    """--classnames goes through the one check of class names (issue 23, item 4), names the
    classes the tokenizer makes equal (item 5) and a name too long for the context briefly, with
    the file (item 16)."""
    root, *_ = world
    path = tmp_path / "names.txt"
    path.write_text(names, encoding="utf-8")
    line = one_line_error(fastprompt("export", root / "run", tmp_path / "onnx", "--classnames",
                                     path), "export", f"--classnames: {path}", *fragments)
    assert len(line) < 400
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("argv, flag, expected", [
    (["train", "--out", "{tmp}/r", "--batch-size=0"], "--batch-size", "an int >= 1"),
    (["train", "--out", "{tmp}/r", "--text-chunk=-1"], "--text-chunk",
     "classes per chunk (an int >= 0) or 'auto'"),
    (["export", "{tmp}/run", "{tmp}/onnx", "--int8", "--min-agreement=1.5"], "--min-agreement",
     "a number in [0, 1]"),
    (["export", "{tmp}/run", "{tmp}/onnx", "--fp16", "--min-agreement=nan"], "--min-agreement",
     "a number in [0, 1]"),
    (["predict", "{tmp}/model.onnx", "{tmp}/x.png", "--batch-size=0"], "--batch-size",
     "an int >= 1"),
])
def test_sizes_are_refused_by_their_flag(tmp_path, capsys, argv, flag, expected):
    """Messages name the flag, not the library parameter it becomes (batch_size, text_chunk,
    min_agreement): issue 23, item 21."""
    from fastprompt.cli import main
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    value = argv[-1].split("=", 1)[1]
    assert (f"fastprompt {argv[0]}: error: argument {flag}: expected {expected}, got {value!r}"
            in capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    """The world's run exported (unverified: what is checked here is predict's behaviour)."""
    out = tmp_path_factory.mktemp("exported") / "onnx"
    fastprompt("export", world[0] / "run", out, "--no-verify", check_rc=0)
    return out


@pytest.mark.parametrize("output", [[], ["--jsonl"]])
def test_predict_into_a_closed_pipe_stops_quietly(exported, tmp_path, output):
    """`fastprompt predict ... | head`: when the reader goes away, predict stops without a
    message and with 141, the status of a Unix tool killed by SIGPIPE (issue 23, item 21)."""
    from PIL import Image
    model = exported
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    proc = subprocess.Popen([sys.executable, "-m", "fastprompt", "predict", model, tmp_path,
                             *output], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b"", (proc.returncode, err)


def test_base_to_new_of_a_cache_run_gives_advice_that_works(world):
    """A run trained from --cache alone has no recorded data: the message says what base-to-new
    needs instead of advising --data, which --base-to-new refuses (issue 23, item 13)."""
    root, *_ = world
    line = one_line_error(fastprompt("eval", root / "run", "--base-to-new", "--no-progress"),
                          "eval", "--base-to-new", "--subsample base", "--data DIR")
    assert "pass --data" not in line and "trained from --cache" in line
    line = one_line_error(fastprompt("eval", root / "run", "--base-to-new", "--data",
                                     root / "shapes"), "eval", "drop --data")
    assert "recorded in its metrics.json" in line


def _unreadable_folder(path, classes=("cat", "dog")):
    for name in classes:
        (path / name).mkdir(parents=True)
        for i in range(2):
            (path / name / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return path


def _no_raw_warnings(stderr):
    assert "UserWarning" not in stderr and "warnings.warn" not in stderr, stderr


def test_eval_all_images_of_unreadable_files_says_test_images(world, tmp_path):
    """eval --data --all-images on a folder of unreadable files: the skipped files are one
    warning line of the fastprompt logger (not Python's UserWarning with its source line), and
    the error calls them test images, which they are (issue 23, item 18)."""
    root, *_ = world
    data = _unreadable_folder(tmp_path / "data")
    for extra in (["--all-images"], []):
        proc = fastprompt("eval", root / "run", "--data", data, *extra, "--no-progress")
        line = one_line_error(proc, "eval", "have no readable test images")
        assert "training" not in line
        _no_raw_warnings(proc.stderr)
        assert all(line.startswith("fastprompt") for line in proc.stderr.splitlines())
        assert [w for w in proc.stderr.splitlines() if "skipped 4 unreadable" in w]


def test_cache_skips_a_fifo_named_like_an_image(world, tmp_path):
    """cache --data with a FIFO named like an image in a class folder: skipped, listed in one
    warning line, the cache built (issue 23, item 2)."""
    root, weights, *_ = world
    data = tmp_path / "data"
    shutil.copytree(root / "shapes", data)
    os.mkfifo(data / "train" / "red_circle" / "upload.jpg")
    proc = subprocess.run([sys.executable, "-m", "fastprompt", "cache", "--pretrained", weights,
                           "--data", data, "--views", "1", "--out", tmp_path / "c.safetensors"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _no_raw_warnings(proc.stderr)
    warned = [w for w in proc.stderr.splitlines() if "upload.jpg" in w]
    assert len(warned) == 1 and "a FIFO, not a regular file" in warned[0]


# ----- issue 23: sweeps, seeds, noise rates, plot --------------------------------------------


@pytest.mark.parametrize("argv, flag, value", [
    (["cache", "--data", "d", "--out", "c.safetensors"], "--seed", "100000000000000000000000"),
    (["train", "--data", "d", "--out", "r"], "--seed", "-1"),
    (["train", "--data", "d", "--out", "r"], "--seed", "1e23"),
    (["eval", "r", "--data", "d"], "--seed", "4294967296"),
    (["export", "r", "--out", "e"], "--seed", "4294967296"),
    (["cache", "--data", "d", "--out", "c.safetensors"], "--noise-rate", "1.5"),
    (["train", "--data", "d", "--out", "r"], "--noise-rate", "nan"),
])
def test_seed_and_noise_rate_flags_are_refused_by_name(tmp_path, capsys, monkeypatch, argv, flag,
                                                       value):
    """Every --seed takes the one seed range, --noise-rate the one rate range, and a value
    outside is refused by the flag before anything is done (issue 23, items 9 and 21)."""
    from fastprompt.cli import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*argv, f"{flag}={value}"])
    assert e.value.code == 2
    expected = "an int in [0, 2**32)" if flag == "--seed" else "a rate in [0, 1]"
    assert (f"fastprompt {argv[0]}: error: argument {flag}: expected {expected}, got {value!r}"
            in capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_a_huge_train_seed_is_one_line_naming_the_flag(world, tmp_path):
    root, weights, *_ = world
    proc = fastprompt("train", "--pretrained", weights, "--data", root / "shapes", "--out",
                      tmp_path / "r", "--seed", 10**23, "--no-progress")
    one_line_error(proc, "train", "--seed", "[0, 2**32)")
    assert list(tmp_path.iterdir()) == []


def _sweep_spec(world, path, **fields):
    root, weights, *_ = world
    spec = {"data": str(root / "shapes"), "pretrained": weights, "views": 1,
            "methods": ["coop"], "seeds": [1], "train": {"epochs": 1, "n_ctx": 2}, **fields}
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("fields, fragments", [
    ({"device": "tpu"}, ["device", "'tpu'"]),
    ({"data": "/no/such/folder"}, ["data", "/no/such/folder"]),
    ({"methods": [{"name": "..", "method": "coop"}]}, ["methods[0].name", "'..'"]),
])
def test_a_refused_sweep_spec_creates_nothing(world, tmp_path, fields, fragments):
    """Spec errors are found before OUT is created (issue 23, items 8, 19 and 20)."""
    spec = _sweep_spec(world, tmp_path / "spec.json", **fields)
    proc = fastprompt("sweep", spec, "--out", tmp_path / "out", "--no-progress")
    one_line_error(proc, "sweep", str(spec), *fragments)
    assert not (tmp_path / "out").exists()


def test_a_sweep_folder_in_use_is_one_line_naming_the_holder(world, tmp_path):
    from fastprompt.protocols.sweep import sweep_lock
    spec = _sweep_spec(world, tmp_path / "spec.json")
    out = tmp_path / "out"
    with sweep_lock(str(out)):
        proc = fastprompt("sweep", spec, "--out", out, "--no-progress")
    one_line_error(proc, "sweep", f"sweep folder {out}", "in use", f"pid {os.getpid()}")
    assert not (out / "sweep.json").exists()


def test_plot_of_a_damaged_metrics_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"epochs": [1, 2], "test_acc": 0.5}))
    one_line_error(fastprompt("plot", tmp_path), "plot", str(tmp_path / "metrics.json"),
                   "epochs[0]")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux: from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by whoever adopted it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process tree from /proc")
def test_killing_a_sweep_takes_its_workers_with_it(world, tmp_path):
    """`kill -9` of `sweep --jobs 2` leaves no worker (nor the resource tracker) behind: each
    worker notices that its parent is gone and exits (issue 23, item 6)."""
    import signal
    import time
    spec = _sweep_spec(world, tmp_path / "spec.json", seeds=[1, 2],
                       train={"epochs": 100000, "n_ctx": 2})
    out = tmp_path / "out"
    with open(tmp_path / "stderr", "w") as stderr:
        sweep = subprocess.Popen([sys.executable, "-m", "fastprompt", "sweep", str(spec),
                                  "--out", str(out), "--jobs", "2", "--no-progress"],
                                 stdout=subprocess.DEVNULL, stderr=stderr)
    children = []
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("runs/*/*/*/*/checkpoint.pt"))) < 2:   # both workers train
            assert sweep.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, "the workers did not start training"
            time.sleep(0.5)
        children = _children(sweep.pid)
        assert len(children) >= 2, children         # two workers (and the resource tracker)
        sweep.kill()
        sweep.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)], (tmp_path / "stderr").read_text()
    finally:
        if sweep.poll() is None:
            sweep.kill()
        for pid in children:   # only on failure: what this test started, by pid
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
