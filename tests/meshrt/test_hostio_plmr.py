"""Host scatter/gather of tiled matrices, and the PLMR device/ledger bookkeeping."""

import numpy as np
import pytest
from meshtest import fabric, layout_params, world

from meshrt import hostio
from meshrt.plmr import PRESETS, WSE2, Cost, Device, Ledger, get_device, register_device


@pytest.mark.mpi
@pytest.mark.parametrize("lay", layout_params())
def test_scatter_gather_roundtrip_and_io_priced(lay):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((13, 17)) if world().Get_rank() == 0 else None
    a_all = world().bcast(a, root=0) if world().Get_size() > 1 else a
    fab = fabric(lay)
    block = hostio.scatter_matrix(fab, a)
    tm, tn = -(-13 // lay.py), -(-17 // lay.px)
    assert block.shape == (lay.by, lay.bx, tm, tn)
    y0, x0 = fab.origin
    np.testing.assert_array_equal(
        block[0, 0, 0, 0],
        np.pad(a_all, ((0, tm * lay.py - 13), (0, tn * lay.px - 17)))[y0 * tm, x0 * tn],
    )
    back = hostio.gather_matrix(fab, block, (13, 17), to_all=True)
    np.testing.assert_array_equal(back, a_all)
    assert fab.ledger.io_bytes == 2 * block.nbytes * fab.nranks
    assert fab.trace == []  # host I/O is control plane: no data-plane messages


@pytest.mark.mpi(min_size=2)
def test_scatter_and_gather_at_another_root():
    from meshrt.mesh import MeshLayout

    size, rank = world().Get_size(), world().Get_rank()
    lay = MeshLayout(2, 2 * size, 1, size)
    fab = fabric(lay)
    a = np.arange(4 * size * 3, dtype=np.float32).reshape(2, 2 * size, 3)
    block = hostio.scatter(fab, a if rank == 1 else None, root=1)
    np.testing.assert_array_equal(block, a[:, 2 * rank : 2 * rank + 2])
    back = hostio.gather(fab, block, root=1)
    if rank == 1:
        np.testing.assert_array_equal(back, a)
    else:
        assert back is None


@pytest.mark.mpi(min_size=2)
def test_scatter_without_tiles_at_the_root_fails_on_every_rank():
    from meshrt.mesh import MeshLayout

    size, rank = world().Get_size(), world().Get_rank()
    fab = fabric(MeshLayout(1, size, 1, size))
    tiles = np.zeros((1, size, 2)) if rank == 0 else None
    with pytest.raises(ValueError, match="root rank 1 passed no tiles"):
        hostio.scatter(fab, tiles, root=1)  # rank 1 is the root and holds nothing


def test_device_presets_and_overrides(device_presets):
    assert set(PRESETS) >= {"wse2", "wse3"}
    d = get_device("wse2:mem_per_core=98304,alpha=2")
    assert d.mem_per_core == 98304 and d.alpha == 2.0 and d.beta == WSE2.beta
    with pytest.raises(ValueError, match="unknown device"):
        get_device("tpu")
    with pytest.raises(ValueError, match="not settable"):
        get_device("wse2:colour=3")
    # an override the cost model cannot use is refused with the field named
    for bad, why in [
        ("alpha=-1", ">= 0"),
        ("task_switch=nan", ">= 0"),
        ("macs_per_cycle=0", "> 0"),
        ("cores_x=0.5", "whole number"),
        ("beta=fast", "not a number"),
    ]:
        with pytest.raises(ValueError, match=why):
            get_device(f"wse2:{bad}")
    assert get_device("wse2:macs_per_cycle=0.5,task_switch=0").macs_per_cycle == 0.5
    mine = Device(
        name="mymesh",
        cores_x=64,
        cores_y=64,
        mem_per_core=1 << 20,
        clock_hz=1e9,
        macs_per_cycle=4,
        alpha=1,
        beta=4,
    )
    register_device(mine)
    assert get_device("mymesh") is mine and device_presets["mymesh"] is mine


def test_fixed_costs_per_vector_step_and_task():
    dev = WSE2.with_(
        alpha=1.0,
        beta=0.0,
        macs_per_cycle=2.0,
        vector_setup=3.0,
        step_overhead=7.0,
        task_switch=100.0,
    )
    led = Ledger(dev)
    # the cores start a kernel: one task switch; 4 vector instructions of set-up
    with led.running("gemv"):
        assert led.record("gemv/local", macs=40, vectors=4) == 7 + 20 + 12 + 100
        # same kernel, another phase: no switch
        assert led.record("gemv/allreduce/level1", words=10, hops=2, overlap=True) == 7 + 12
    # a different kernel: one task switch, recorded as <kernel>/task_switch
    with led.running("norm"):
        assert led.record("norm/scale", macs=2) == 7 + 1 + 100
    assert led.ops["norm/task_switch"].activations == 1
    # a task-chained kernel: one activation per step, plus the switch into it
    with led.running("gemm"):
        assert led.record("gemm/step", macs=20, count=3, tasks=1) == 3 * (7 + 10 + 100) + 100
    with led.section("layer0"), led.running("qkv"):
        led.record("qkv/local", macs=2)
        led.record("qkv/allreduce", words=1, hops=1)
    assert led.ops["layer0/qkv/allreduce"].activations == 0
    assert led.ops["layer0/qkv/task_switch"].activations == 1
    # the kernel is what the writer names, not the record's name: renaming a record changes
    # no figure, and a record written outside any kernel is a kernel of its own
    with led.running("qkv"):
        assert led.record("renamed/part", macs=2) == 7 + 1 + 100  # kernel qkv: a switch
        assert led.record("other", macs=2) == 7 + 1  # still qkv
    assert "renamed/task_switch" not in led.ops and led.ops["qkv/task_switch"].activations == 1
    assert led.record("loose/a", macs=2) == 7 + 1 + 100
    assert led.record("loose/b", macs=2) == 7 + 1 + 100  # its own kernel: another switch
    assert led.totals().activations == 1 + 1 + (1 + 3) + 1 + 1 + 2
    assert led.totals().vectors == 4
    led.reset()
    assert led.record("x", macs=2) == 8 + 100  # reset: no kernel running
    warm = Ledger(dev, kernel="gemv")  # a benchmark loop: the kernel already runs
    with warm.running("gemv"):
        assert warm.record("gemv/local", macs=40, vectors=4) == 7 + 20 + 12


def test_ledger_cycles_overlap_and_violations():
    led = Ledger(
        WSE2.with_(
            alpha=1.0,
            beta=10.0,
            macs_per_cycle=2.0,
            vector_setup=0.0,
            task_switch=0.0,
            step_overhead=0.0,
        )
    )
    # compute 100 cycles, comm 5 + 20 + 8 (one fp16 element per 32-bit wavelet) = 33 cycles
    assert led.record("a", macs=200, words=8, hops=5, routings=2, overlap=True) == 100
    assert led.record("b", macs=200, words=8, hops=5, routings=2, overlap=False, count=2) == 266
    t = led.totals()
    assert (t.steps, t.hops, t.routings, t.macs) == (3, 15, 6, 600)
    assert t.cycles == 366 and t.compute_cycles == 300 and t.comm_cycles == 99
    with led.section("layer0"):
        led.record("c", macs=2)
    assert "layer0/c" in led.ops
    assert led.violations() == []
    led.memory("big", 30 * 1024)  # 60 KiB of fp16 > 48 KiB
    led.routes("many", 30)
    v = led.violations()
    assert any("memory" in x for x in v) and any("routing" in x for x in v)
    assert led.summary()["violations"] == v


def test_cost_charge_equals_record_and_algebra():
    dev = WSE2.with_(alpha=1.0, beta=10.0, macs_per_cycle=2.0, vector_setup=0.0, task_switch=50.0)
    step = Cost(macs=200, words=8, hops=5, routings=2, overlap=False, routes=3)
    a, b = Ledger(dev), Ledger(dev)
    # compute 100, comm 5 + 20 + 8 (one fp16 element per wavelet), and the switch into "x"
    assert (
        a.charge("x", step * 2)
        == b.record("x", macs=200, words=8, hops=5, routings=2, overlap=False, count=2)
        == 266 + 50
    )
    tasked = step.with_(vectors=4, tasks=1)
    assert (
        a.charge("y", tasked)
        == b.record("y", macs=200, words=8, hops=5, routings=2, vectors=4, tasks=1)
        == 133 + 50 + 50
    )
    assert a.ops == b.ops and a.max_routes == 3 and b.max_routes == 0
    assert (step + step * 2).count == 3 and (3 * step).count == 3
    with pytest.raises(ValueError, match="different steps"):
        step + step.with_(hops=6)


def _layer_work(led, step):
    """What a layer of some program writes: two kernels, a route, a peak and host traffic."""
    led.charge("norm", step)
    with led.running("gemv"):
        led.charge("gemv/local", step.with_(vectors=3))
        with led.running("gemv/allreduce"):  # part of the GEMV: the outer block names it
            led.charge("gemv/allreduce", Cost(words=7, hops=2, overlap=True, routes=4))
        led.memory("gemv", 100)
        led.routes("gemv/extra", 5)
    led.io(12, 2)


def test_tape_replays_a_layer_with_the_same_figures():
    dev = WSE2.with_(task_switch=50.0, vector_setup=1.5)
    live, taped = Ledger(dev), Ledger(dev)
    for token in range(3):  # figures accumulate over tokens in the same order
        # each token's tape has the same ops at other costs (a KV cache filling up): replays
        # of a tape shape resolved on an earlier token add this token's figures
        step = Cost(macs=0.1 * (token + 1), words=3 + token, hops=1, routings=1, overlap=False)
        live.charge("embed", step)
        taped.charge("embed", step)
        tape = None
        for i in range(4):
            with live.section(f"layer{i}"):
                _layer_work(live, step)
            with taped.section(f"layer{i}"):
                if tape is None:
                    with taped.recording() as tape:
                        _layer_work(taped, step)
                else:
                    taped.replay(tape)
    assert taped.ops == live.ops and list(taped.ops) == list(live.ops)
    assert taped.summary() == live.summary()
    assert taped.kernel == live.kernel == "layer3/gemv"
    assert "layer2/gemv/task_switch" in taped.ops and taped.peak_memory_op == "layer0/gemv"
    with pytest.raises(RuntimeError, match="records one tape"):
        with taped.recording():
            with taped.recording():
                pass
    with pytest.raises(ValueError, match="device"):
        Ledger(WSE2).replay(tape)
    with pytest.raises(RuntimeError, match="while it records"):
        with taped.recording():
            taped.replay(tape)


def test_a_sealed_ledger_refuses_every_record_and_names_it():
    """Kernels run unrecorded inside a sealed block (their op's kind prices them): a record
    written there is an error naming it, never a figure added twice."""
    led = Ledger(WSE2)
    with led.section("layer2"), led.sealed("the decode program"):
        for write in (
            lambda: led.charge("qkv/local", Cost(macs=1)),
            lambda: led.memory("qkv", 4),
            lambda: led.routes("qkv", 2),
            lambda: led.io(8),
        ):
            with pytest.raises(RuntimeError, match="sealed for the decode program"):
                write()
        with pytest.raises(RuntimeError, match="'layer2/qkv/local'"):
            led.charge("qkv/local", Cost(macs=1))
    assert not led.ops and led.peak_memory == 0 and led.io_bytes == 0
    led.charge("qkv/local", Cost(macs=1))  # the block closed: records are written again
    assert led.ops["qkv/local"].macs == 1
