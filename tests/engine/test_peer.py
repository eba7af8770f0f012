"""memlab's switches in programs memlab did not start (memlab.engine.attached), and
the peer-suite command (memlab.peer) that runs DeepSpeed's own tests with them:
the switches reach every process such a program spawns, and the command's
difference names exactly the tests that pass stock and not switched."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT

from memlab import KnobError
from memlab.engine import attached
from memlab.optimizations import OPTIMIZATIONS

pytestmark = pytest.mark.engine

# A plain DeepSpeed program (memlab's patch registry read only to report): the patches in place
# in it and in a child it spawns, as one JSON line.
PROGRAM = textwrap.dedent("""
    import json, multiprocessing as mp
    def installed():
        import deepspeed  # noqa: F401  the switches wait for this import
        from memlab.engine import patching
        return patching.installed()
    if __name__ == "__main__":
        with mp.get_context("spawn").Pool(1) as pool:
            child = pool.apply(installed)
        print("PATCHES " + json.dumps({"parent": installed(), "child": child}))
""")


def patches_in(tmp_path, env):
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PATCHES ")]
    assert lines, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(lines[-1][len("PATCHES "):])


def test_the_switches_reach_a_program_and_the_processes_it_spawns(tmp_path):
    seen = patches_in(tmp_path, attached.environment("all"))
    for where in ("parent", "child"):
        patched = set(seen[where])
        # one patch each switch is known by, in both processes
        assert {"DeepSpeedZeroOptimizer_Stage3._create_fp16_partitions_with_defragmentation",  # optimizer_staging
                "DeepSpeedEngine.save_checkpoint",  # storage
                "DeepSpeedZeroOptimizer_Stage3.has_overflow",  # grad_checks
                "DeepSpeedZeroOptimizer_Stage3._move_to_flat_buffer",  # pinning
                "AsyncPartitionedParameterSwapper.swap_in"} <= patched, where  # pool
    plain = dict(os.environ, PYTHONPATH=ROOT)
    assert patches_in(tmp_path, plain) == {"parent": [], "child": []}


def test_one_switch_installs_that_switch_alone(tmp_path):
    seen = patches_in(tmp_path, attached.environment("memascend.grad_checks"))
    assert seen["parent"] == seen["child"] and seen["parent"]
    assert all("has_overflow" in p or "norm" in p for p in seen["parent"]), seen["parent"]


def test_a_bad_switch_name_is_one_line_naming_the_variable():
    with pytest.raises(KnobError, match="MEMLAB_SWITCHES.*memascend.pool"):
        attached.environment("memascend.poool")
    values = attached.switch_values("all")
    assert all(values[o.switch] == o.optimized for o in OPTIMIZATIONS)


def fake_checkout(root):
    """A source tree laid out as DeepSpeed's (tests/conftest.py, tests/unit/...): one test that
    passes either way, one that fails once the switches are in, one skipped."""
    unit = root / "tests" / "unit"
    unit.mkdir(parents=True)
    (root / "tests" / "conftest.py").write_text("")
    (unit / "test_offload_fake.py").write_text(textwrap.dedent("""
        import pytest
        def test_offload_always():
            import deepspeed  # noqa: F401
        def test_offload_only_stock():
            import deepspeed  # noqa: F401
            from memlab.engine import patching
            assert not patching.installed()
        def test_offload_skipped():
            pytest.skip("not here")
    """))
    return root


def test_the_peer_command_prints_what_passes_stock_and_not_switched(tmp_path):
    checkout = fake_checkout(tmp_path / "ds")
    out = subprocess.run([sys.executable, "-m", "memlab.peer", str(checkout), "tests/unit/test_offload_fake.py",
                          "--switches", "all;memascend.pool", "--out", str(tmp_path / "out")],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("mode"):]
    for mode, passed, failed in (("stock", 2, 0), ("all", 1, 1), ("memascend.pool", 1, 1)):
        row = next(line.split() for line in table.splitlines() if line.split()[:1] == [mode])
        assert row[1:] == [str(passed), str(failed), "0", "1"], row
    assert table.count("test_offload_fake::test_offload_only_stock: failed") == 2
    assert "test_offload_always" not in table
    assert sorted(os.listdir(tmp_path / "out")) == ["all.xml", "memascend.pool.xml", "stock.xml"]


def test_the_peer_command_refuses_what_is_not_a_checkout(tmp_path):
    out = subprocess.run([sys.executable, "-m", "memlab.peer", str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert out.returncode == 2 and "not a DeepSpeed checkout" in out.stderr


def test_bounded_grad_staging_in_a_program_sums_micro_batches_as_stock(tmp_path):
    """A plain DeepSpeed program (scripts/plain_deepspeed.py) with memascend.grad_staging installed through
    its environment, parameters and optimizer on NVMe: with 1, 2 and 4 micro-batches per step (summed on
    NVMe between them) the switch acts and the losses are the unswitched program's, to the bit."""
    from memlab import Knobs, ModelSpec
    from memlab.knobs import ResolvedKnobs

    spec = ModelSpec.resolve("tiny-llama")
    (tmp_path / "model.json").write_text(json.dumps(spec.config))

    def program(name, accumulation, env):
        config = ResolvedKnobs(Knobs(), spec, accelerator="cpu").to_ds_config(str(tmp_path / name / "swap"))
        config["gradient_accumulation_steps"] = accumulation
        config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * accumulation
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plain_deepspeed.py"),
                              str(tmp_path / "model.json"), str(tmp_path / f"{name}.json"),
                              "--steps", str(4 * accumulation)],  # engine.step per micro-batch: 4 optimizer steps
                             env=env, capture_output=True, text=True, timeout=600)
        # the JSON line is the program's verdict: the interpreter's exit after it sometimes aborts
        # ("terminate called without an active exception") in plain DeepSpeed too
        return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr

    switched = attached.environment("memascend.grad_staging")
    plain = dict(attached.environment("memascend.grad_staging"))
    del plain[attached.ENV]  # the same environment, no switch
    for accumulation in (1, 2, 4):
        ours, err = program(f"switched{accumulation}", accumulation, switched)
        reference, _ = program(f"plain{accumulation}", accumulation, plain)
        assert "does not act" not in err, err[-2000:]
        assert ours["ok"] and len(ours["losses"]) == 4 * accumulation, ours
        assert ours["losses"] == reference["losses"], (accumulation, ours, reference)
