"""The ``jmoe`` command line, run as a user would (subprocess, default model)."""

import json
import subprocess
import sys

from conftest import own_stderr_lines


def jmoe_cli(*args):
    return subprocess.run([sys.executable, "-m", "jmoe.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_default_model_without_flags():
    r = jmoe_cli("generate", "123+456=")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "123+456=579"


def test_generate_json_prompts_file_and_options(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("7+8=\n40+2=\n")
    r = jmoe_cli("generate", "--prompts-file", str(f), "--json", "--adaptive", "linear",
                 "--adaptive-maximum", "4", "--update-interval", "1", "--threshold", "0.9")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompts"] == ["7+8=", "40+2="] and len(out["texts"]) == 2
    assert out["nfe"] >= 1 and out["expert_work"] > 0


def test_show_steps_and_routing_table():
    r = jmoe_cli("generate", "12+30=", "--show-steps")
    assert r.returncode == 0, r.stderr
    assert "step 1/" in r.stdout and r.stdout.strip().splitlines()[-1] == "12+30=42"
    assert "\x1b" not in r.stdout  # a pipe gets plain lines, no terminal escape codes
    r = jmoe_cli("routing", "123+456=579")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["layer", "tokens", "experts"] and len(lines) == 5


def test_bad_options_are_one_line_errors():
    for args in (["generate", "1+1=", "--remasking", "nope"], ["generate", "1+1=", "--steps", "x"],
                 ["generate", "1#1="], ["generate", "1+1=", "--gen-length", "5",
                                         "--block-length", "2"], ["frobnicate"]):
        r = jmoe_cli(*args)
        assert r.returncode == 2, (args, r.stdout)
        ours = own_stderr_lines(r.stderr)
        assert "Traceback" not in r.stderr and len(ours) == 1, (args, r.stderr)
        assert ours[0].startswith("error:"), (args, r.stderr)


def test_generate_with_the_approximate_caches():
    # the default model's block is the whole 6-token answer: prefix and dual with a
    # window refresh give the sum (the caches' rules are tested in test_kv_caches.py)
    for args in (["--cache", "dual", "--cache-window", "2", "0"],
                 ["--cache", "prefix", "--cache-refresh", "2"], ["--no-cache"]):
        r = jmoe_cli("generate", "123+456=", *args)
        assert r.returncode == 0, (args, r.stderr)
        assert r.stdout.strip().splitlines()[-1] == "123+456=579", (args, r.stdout)
    for args in (["--cache", "nope"], ["--cache", "dual", "--cache-window", "1"],
                 ["--cache-refresh", "2"]):
        r = jmoe_cli("generate", "1+1=", *args)
        assert r.returncode == 2 and len(own_stderr_lines(r.stderr)) == 1, (args, r.stderr)
