"""The command line as a user runs it, including the README's examples."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cli_helpers import run_cli_here
from maverick_ray.checkpoint.writer import TINY_VERSION

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args, timeout=240, env=None):
    """`python -m maverick_ray.cli ARGS` as a user runs it: its own interpreter."""
    return subprocess.run([sys.executable, "-m", "maverick_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ.copy(), cwd=ROOT)


# The same command in this process (tests/cli_helpers.py), for runs that start no Ray: the same
# exit status, stdout and stderr without a new interpreter's imports. Each CLI path still runs
# as a subprocess somewhere: generate here and in the README examples (test_images: with --image),
# make-checkpoint in the README examples.
here = run_cli_here


def test_generate_json_greedy_is_deterministic_and_matches_engine(tiny_ckpt):
    a = run("generate", "--model", str(tiny_ckpt), "--prompt", "Hello", "--max-tokens", "8", "--json")
    assert a.returncode == 0, a.stderr
    out = json.loads(a.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) <= 8 and isinstance(out["text"], str)
    b = here("generate", "--model", str(tiny_ckpt), "--prompt", "Hello", "--max-tokens", "8", "--json")
    assert b.returncode == 0, b.stderr
    assert json.loads(b.stdout.strip().splitlines()[-1]) == out  # another process, the same tokens


def test_token_ids_work_without_tokenizer_files(tmp_path, tiny_ckpt):
    ck = tmp_path / "no_tok"
    shutil.copytree(tiny_ckpt, ck)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ck / f).unlink()
    r = here("generate", "--model", str(ck), "--token-ids", "5,6,7,8", "--max-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) <= 5 and out["text"] is None
    r = here("generate", "--model", str(ck), "--prompt", "hi")
    assert r.returncode == 2 and "tokenizer.json: not found" in r.stderr


def test_generate_with_ep2_on_ray_matches_ep1(tiny_ckpt):
    args = ["generate", "--model", str(tiny_ckpt), "--token-ids", "11,12,13,14,15", "--max-tokens", "6", "--json"]
    one = here(*args)
    # A dead cluster recorded by an earlier `ray start` must not capture the local start.
    ray_tmp = Path(tempfile.mkdtemp(prefix="mr", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    try:
        two = run(*args, "--ep", "2", env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert json.loads(one.stdout.strip().splitlines()[-1]) == json.loads(two.stdout.strip().splitlines()[-1])


def test_bad_input_gives_clear_errors(tmp_path, tiny_ckpt):
    r = here("generate", "--model", str(tmp_path / "nowhere"), "--token-ids", "1")
    assert r.returncode == 2 and "config.json: not found" in r.stderr and "Traceback" not in r.stderr
    r = here("generate", "--model", str(tiny_ckpt), "--token-ids", "1,x")
    assert r.returncode == 2 and "--token-ids" in r.stderr
    r = here("generate", "--model", str(tiny_ckpt), "--token-ids", "1,2", "--max-tokens", "0")
    assert r.returncode == 2 and "max_tokens" in r.stderr
    r = here("generate", "--model", str(tiny_ckpt), "--token-ids", "1,2", "--max-tokens", "5000")
    assert r.returncode == 2 and "context length" in r.stderr


def test_make_checkpoint_cli(tmp_path):
    r = here("make-checkpoint", str(tmp_path / "ck"), "--preset", "tiny", "--experts-layout", "split")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ck" / "config.json").exists()
    r = here("make-checkpoint", str(tmp_path / "ck"))
    assert r.returncode == 2 and "not empty" in r.stderr


def test_default_checkpoint_is_created_on_first_use(tmp_path):
    r = here("generate", "--prompt", "Hi", "--max-tokens", "3", "--json",
             env={"MAVERICK_RAY_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cache" / f"tiny-v{TINY_VERSION}" / "config.json").exists()


def test_help_texts():
    for sub in ("generate", "make-checkpoint", "serve"):
        r = run(sub, "--help")
        assert r.returncode == 0 and "--" in r.stdout


def readme_commands() -> list[tuple[str, str | None]]:
    """(command, the answer its `# -> answer` comment shows, if any) per README example."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    out = []
    for block in blocks:
        for line in block.splitlines():
            if line.strip().startswith(".venv/bin/maverick-ray"):
                command, _, comment = line.partition(" #")
                answer = comment.strip()[2:].strip() if comment.strip().startswith("->") else None
                out.append((command.strip(), answer))
    return out


@pytest.mark.parametrize("command,answer", readme_commands())
def test_readme_examples_run(command, answer, tmp_path):
    """Every maverick-ray command in the README's examples runs (servers: until ready), and prints
    the answer its `# -> answer` comment shows."""
    import shlex

    argv = shlex.split(command)[1:]
    argv = [a.replace("/tmp/", str(tmp_path) + "/") for a in argv]
    exe = [str(BIN / "maverick-ray")]
    if argv[0] == "serve":
        from serve_fixtures import free_port

        port = free_port()
        argv = [a for a in argv] + ["--port", str(port), "--metrics-port", str(free_port())]
        proc = subprocess.Popen(exe + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "maverick-ray ready" in line:
                    break
            assert any("maverick-ray ready" in line for line in lines), "".join(lines[-20:])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        # SIGTERM on reading the ready line takes the server's own clean shutdown (exit 0), not
        # Ray's handler (exit 15), whose path once hung the process for over a minute
        assert proc.returncode == 0, "".join(lines[-20:])
        return
    r = subprocess.run(exe + argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    if answer is not None:
        assert answer in r.stdout, f"the README shows {answer!r}; the command printed {r.stdout!r}"


def test_generate_with_an_image_matches_the_engine_and_names_a_missing_file(tmp_path, tiny_ckpt):
    from image_helpers import image_bytes
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.multimodal import prepare_images_from_files
    from maverick_ray.engine.sampling import SamplingParams

    path = tmp_path / "cat.png"
    path.write_bytes(image_bytes(90, 60, seed=3))
    r = here("generate", "--model", str(tiny_ckpt), "--prompt", "Describe.", "--image", str(path),
             "--max-tokens", "6", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]
    ids, mm = prepare_images_from_files(tiny_ckpt, ChatTokenizer.from_pretrained(tiny_ckpt), [str(path)],
                                        "Describe.", 8)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=2, max_model_len=512)) as eng:
        want = eng.generate(ids, SamplingParams(max_tokens=6, temperature=0), mm_inputs=mm)["token_ids"]
    assert got == want and len(got) > 0
    missing = here("generate", "--model", str(tiny_ckpt), "--prompt", "Describe.", "--image", str(tmp_path / "no.png"))
    assert missing.returncode != 0 and "no.png" in missing.stderr and "Traceback" not in missing.stderr
