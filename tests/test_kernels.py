"""The sparse training path against its dense reference twin: same loss, same gradients."""

import copy
import itertools
import os
import subprocess
import sys

import pytest
import torch

from paper_lib.sae import SAEConfig, batchtopk, kernels, make_sae
from tests.conftest import require_grads, requires_cuda

CASES = {
    "topk": dict(k=5),
    "topk_multi": dict(k=5, multi_topk=True),
    "batchtopk": dict(k=5),
    "matryoshka": dict(k=5),
    "topafa": dict(standardize_input=True),
}


def _grads(sae, x, dead, sparse: bool):
    with kernels.use_sparse(sparse):
        out = sae(x)
        terms = sae.loss(out, dead)
        loss = sum(terms.values())
        loss.backward()
    return {k: float(v.detach()) for k, v in terms.items()}, {
        n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


STRATEGIES = list(itertools.product(kernels.GRADS, kernels.TOPK))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_dead", [False, True], ids=["no_dead", "auxk"])
@pytest.mark.parametrize("grads,topk", STRATEGIES, ids=["-".join(s) for s in STRATEGIES])
def test_sparse_matches_dense(case, with_dead, grads, topk):
    """Loss terms and every parameter gradient agree (float32, 1e-4 relative), for every
    kernel strategy (blockmax: the 48 latents form 12 blocks of 4)."""
    require_grads(grads)
    arch = "topk" if case == "topk_multi" else case
    sae = make_sae(SAEConfig(arch, 12, 48, seed=3, **CASES[case]))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        if arch == "topafa":
            sae.b_enc.zero_()
    twin = copy.deepcopy(sae)
    x = torch.randn(24, 12)
    dead = torch.zeros(48, dtype=torch.bool)
    if with_dead:
        dead[::3] = True
    with kernels.strategy(grads=grads, topk=topk):
        terms_s, g_s = _grads(sae, x, dead, True)
    terms_d, g_d = _grads(twin, x, dead, False)
    assert terms_s.keys() == terms_d.keys()
    for k in terms_s:
        assert terms_s[k] == pytest.approx(terms_d[k], rel=1e-5, abs=1e-6), k
    assert g_s.keys() == g_d.keys()
    for name in g_s:
        err = (g_s[name] - g_d[name]).norm() / g_d[name].norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("grads", kernels.GRADS)
def test_input_gradient_matches_dense(grads):
    """d loss / d x through the sparse encoder (with AuxK's dense part) equals the dense
    reference's, for every strategy."""
    require_grads(grads)
    sae = make_sae(SAEConfig("topk", 12, 48, k=5, seed=1))
    twin = copy.deepcopy(sae)
    x = torch.randn(24, 12)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::4] = True
    got = []
    for model, sparse in ((sae, True), (twin, False)):
        xi = x.clone().requires_grad_()
        with kernels.use_sparse(sparse), kernels.strategy(grads=grads):
            sum(model.loss(model(xi), dead).values()).backward()
        got.append(xi.grad)
    assert torch.allclose(got[0], got[1], rtol=1e-4, atol=1e-6)


def test_sparse_decode_hand_case():
    """Rows 0 and 1 select decoder rows {0, 2} and {1}: sums of weighted rows."""
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    out = kernels.sparse_decode(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]),
                                torch.tensor([1.0, 0.5, 3.0]), w, batch=2)
    assert out.tolist() == [[2.0, 1.0], [0.0, 3.0]]


def test_row_topk_and_offsets():
    pre = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    rows, cols = kernels.row_topk(2)(pre)
    assert rows.tolist() == [0, 0, 1, 1]
    assert sorted(cols[:2].tolist()) == [1, 2] and sorted(cols[2:].tolist()) == [0, 2]
    assert kernels.offsets_from_rows(torch.tensor([0, 0, 2]), 3).tolist() == [0, 2, 2]


def test_topk_block_hand_cases():
    """sqrt(n / k) rounded to a power of two, shrunk until k whole blocks fit; None where
    no block of 2 or more columns works."""
    assert kernels.topk_block(32768, 32) == 32      # sqrt(1024)
    assert kernels.topk_block(65536, 64) == 32
    assert kernels.topk_block(48, 5) == 4           # sqrt(9.6) = 3.1
    assert kernels.topk_block(2048, 8) == 16        # sqrt(256)
    assert kernels.topk_block(24, 5) == 2           # 2 would leave 12 >= 5 blocks
    assert kernels.topk_block(19, 4) is None        # n < 4 k: plain topk
    assert kernels.topk_block(1001, 8) is None      # odd n: no block divides it


def test_blockmax_topk_is_exact_with_ties_and_one_hot_block():
    """The k blocks with the largest maxima hold each row's k largest values: also when all
    of them sit in one block, when every block's maximum ties, and when one block holds
    the row's k largest and the other blocks' maxima tie with its smallest."""
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(5, 64, generator=gen)
    pre[1, 16:24] += 10.0                      # row 1: its top 8 all in block 2 of width 8
    pre[2] = torch.tensor([1.0, 2.0] * 32)     # row 2: every block's maximum is 2
    pre[3] = 0.0
    pre[3, 8:16] = torch.arange(8.0) + 1.0     # row 3: top 8 = 1..8 in one block,
    pre[3, ::8] = torch.where(torch.arange(8) == 1, pre[3, 8], 1.0)  # other maxima tie at 1
    pre[4] = torch.linspace(-1.0, 1.0, 64)     # row 4: top 8 = the last block, sorted
    idx = kernels.blockmax_topk_indices(pre, 8, 8)
    got = pre.gather(1, idx).sort(dim=1).values
    want = pre.topk(8, dim=1).values.sort(dim=1).values
    assert torch.equal(got, want)
    assert sorted(idx[1].tolist()) == list(range(16, 24))
    assert sorted(idx[4].tolist()) == list(range(56, 64))
    assert all(len(set(r)) == 8 for r in idx.tolist())  # no column picked twice


def test_blockmax_strategy_selects_like_topk():
    """row_topk under "blockmax" gives torch.topk's values, and falls back to it where no
    block width applies (n = 30, k = 8)."""
    for n, k in ((4096, 32), (30, 8)):
        pre = torch.randn(16, n, generator=torch.Generator().manual_seed(n))
        with kernels.strategy(topk="blockmax"):
            rows, cols = kernels.row_topk(k)(pre)
        assert rows.tolist() == [r for r in range(16) for _ in range(k)]
        got = pre[rows, cols].view(16, k).sort(dim=1).values
        assert torch.equal(got, pre.topk(k, dim=1).values.sort(dim=1).values)


@pytest.mark.parametrize("grads", kernels.GRADS)
def test_decode_gradients_hand_case(grads):
    """Each strategy's decoder on the hand case above, and its gradients: dW_dec row c =
    sum of vals * g over the rows selecting c; d vals = <g[row], W_dec[col]>."""
    require_grads(grads)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], requires_grad=True)
    vals = torch.tensor([1.0, 0.5, 3.0], requires_grad=True)
    with kernels.strategy(grads=grads):
        out = kernels.sparse_decode(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), vals, w,
                                    batch=2)
    assert out.tolist() == [[2.0, 1.0], [0.0, 3.0]]
    out.backward(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert w.grad.tolist() == [[1.0, 2.0], [9.0, 12.0], [0.5, 1.0]]
    assert vals.grad.tolist() == [1.0, 6.0, 4.0]


@pytest.mark.parametrize("grads", ["gemm", "triton"])
def test_decode_reads_weights_in_compute_dtype(grads):
    """Under bf16 autocast the gemm and triton decoders read W_dec cast once to bf16, in
    decoding and in the selected values' gradient: 1 + 2^-9 reads as 1 in both (the hand
    case above otherwise); W_dec's own gradient still arrives in fp32."""
    require_grads(grads)
    w = torch.tensor([[1.0 + 2**-9, 0.0], [0.0, 1.0], [2.0, 2.0]], requires_grad=True)
    vals = torch.tensor([1.0, 0.5, 3.0], requires_grad=True)
    with kernels.strategy(grads=grads), torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.sparse_decode(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), vals, w,
                                    batch=2)
    assert out.dtype == torch.bfloat16 and out.tolist() == [[2.0, 1.0], [0.0, 3.0]]
    out.float().backward(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert w.grad.dtype == torch.float32
    assert w.grad.tolist() == [[1.0, 2.0], [9.0, 12.0], [0.5, 1.0]]
    assert vals.grad.tolist() == [1.0, 6.0, 4.0]


@pytest.mark.parametrize("arch", ["topk", "matryoshka"])
def test_triton_sorts_the_selection_once(monkeypatch, arch):
    """One forward and backward under the triton strategy orders the selection by column
    once: the decoder's and the encoder's backward share it (their gradients are checked
    against the dense reference in test_sparse_matches_dense)."""
    require_grads("triton")
    from paper_lib.sae import triton_kernels as tk

    made = []
    real = tk.ColumnOrder

    def counting(cols, n):
        made.append(n)
        return real(cols, n)

    monkeypatch.setattr(tk, "ColumnOrder", counting)
    sae = make_sae(SAEConfig(arch, 12, 48, k=5, seed=0))
    with kernels.use_sparse(True), kernels.strategy(grads="triton"):
        sum(sae.loss(sae(torch.randn(16, 12)), None).values()).backward()
    assert made == [48]
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selected_dots_hand_case(dtype):
    """csr's gradient of the selected values, <a[row], b[col]>, also in bf16 (the sampled
    product it replaces has no bf16 kernel): rows of a [[1, 2], [3, 4]], b [[1, 0], [0.5, 1],
    [2, -1]]; selections (0, 2), (1, 1), (1, 0) give 2 - 2, 1.5 + 4, 3."""
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
    b = torch.tensor([[1.0, 0.0], [0.5, 1.0], [2.0, -1.0]], dtype=dtype)
    got = kernels.selected_dots(a, b, torch.tensor([0, 1, 1]), torch.tensor([2, 1, 0]))
    assert got.dtype == dtype and got.tolist() == [0.0, 5.5, 3.0]


def _triton_device() -> str:
    """Where the Triton kernels run in this session: CUDA, else the CPU interpreter."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    require_grads("triton", dev)
    return dev


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_hand_case(dtype):
    """The Triton kernels on the hand case: x rows [1, 2], [3, 4], [5, 6]; selections
    (row, col, coef) = (0, 2, 1), (0, 0, 2), (1, 2, -1), (2, 1, 0.5) over 4 columns give
    column sums 2 * [1, 2]; 0.5 * [5, 6]; [1, 2] - [3, 4]; nothing (zeros), in fp32; dots
    with W rows [1, 0], [0, 1], [2, 2], [1, 1]: 2 + 4, 1, 6 + 8, 6."""
    dev = _triton_device()
    from paper_lib.sae import triton_kernels as tk

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=dtype, device=dev)
    rows = torch.tensor([0, 0, 1, 2], device=dev)
    cols = torch.tensor([2, 0, 2, 1], device=dev)
    coef = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=dtype, device=dev)
    order = tk.ColumnOrder(cols, 4)
    assert order.seg.tolist() == [0, 1, 2, 4, 4]
    got = tk.segment_rows(x, rows, coef, order)
    assert got.dtype == torch.float32
    assert got.tolist() == [[2.0, 4.0], [2.5, 3.0], [-2.0, -2.0], [0.0, 0.0]]
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, 1.0]], dtype=dtype, device=dev)
    assert tk.selected_dots(x, w, rows, cols).tolist() == [6.0, 1.0, 14.0, 6.0]


def _triton_candidates() -> list:
    """None (the autotuner's pick) and every autotuning candidate of both kernels, as
    (segment_rows config, selected_dots config) pairs; [None] without Triton."""
    try:
        from paper_lib.sae import triton_kernels as tk
    except ImportError:
        return [None]
    seg, dots = tk.candidates(**tk.SEGMENT_ROWS_GRID), tk.candidates(**tk.SELECTED_DOTS_GRID)
    return [None] + list(zip(seg, dots))


@pytest.mark.parametrize("configs", _triton_candidates(),
                         ids=lambda c: "autotuner" if c is None else "+".join(
                             "S{BLOCK_S}-D{BLOCK_D}-w".format(**k.kwargs) + str(k.num_warps)
                             for k in c))
def test_triton_kernels_span_blocks(configs):
    """Past one block: d = 300 (blocks of 256 and 128 columns), 100 selections, some
    columns with more selections than one loop step (8-64) holds: matches index_add and
    row-wise dots in float32, through the autotuner and under every candidate it may pick
    (on the CPU the interpreter runs each; the autotuner there has the default alone)."""
    dev = _triton_device()
    from paper_lib.sae import triton_kernels as tk

    seg_cfg, dots_cfg = configs or (None, None)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 300, generator=gen), torch.randn(7, 300, generator=gen)
    rows, cols = torch.randint(0, 50, (100,), generator=gen), torch.randint(0, 7, (100,),
                                                                              generator=gen)
    coef = torch.randn(100, generator=gen)
    want = torch.zeros(7, 300).index_add_(0, cols, a[rows] * coef[:, None])
    a, b, rows, cols, coef = (t.to(dev) for t in (a, b, rows, cols, coef))
    got = tk.segment_rows(a, rows, coef, tk.ColumnOrder(cols, 7), config=seg_cfg).cpu()
    assert torch.allclose(got, want, atol=1e-5)
    dots = tk.selected_dots(a, b, rows, cols, config=dots_cfg).cpu()
    assert torch.allclose(dots, (a[rows] * b[cols]).sum(1).cpu(), atol=1e-4)


@pytest.mark.parametrize("grads", kernels.GRADS)
def test_grouped_decode_hand_case(grads):
    """Nested groups ending at columns 1 and 3: each selection decodes into its own
    (row, group) slot; gradients read g at that slot: dW_dec row c = vals * g[row, group(c)],
    d vals = <g[row, group], W_dec[col]>."""
    require_grads(grads)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], requires_grad=True)
    vals = torch.tensor([1.0, 0.5, 3.0], requires_grad=True)
    with kernels.strategy(grads=grads):
        out = kernels.sparse_decode(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), vals, w,
                                    batch=2, ends=(1, 3))
    assert out.tolist() == [[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 3.0]]]
    out.backward(torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]))
    assert w.grad.tolist() == [[1.0, 2.0], [21.0, 24.0], [1.5, 2.0]]
    assert vals.grad.tolist() == [1.0, 14.0, 8.0]


def test_triton_refuses_cpu_tensors_in_forward(monkeypatch):
    """Outside Triton's interpreter, CPU tensors under grads="triton" are refused when the
    forward starts (encoder and decoder), naming the fix, not at the first backward."""
    require_grads("triton")
    from paper_lib.sae import triton_kernels as tk

    monkeypatch.setattr(tk, "INTERPRETED", False)  # as on a machine with CUDA
    sae = make_sae(SAEConfig("topk", 12, 48, k=5, seed=0))
    with kernels.use_sparse(True), kernels.strategy(grads="triton"):
        with pytest.raises(ValueError, match="got cpu tensors.*grads='index'"):
            sae(torch.randn(4, 12))
        with pytest.raises(ValueError, match="got cpu tensors"):
            kernels.sparse_decode(torch.tensor([0]), torch.tensor([1]), torch.ones(1),
                                  torch.randn(48, 12), batch=1)


def test_strategy_rejects_unknown_names():
    with pytest.raises(ValueError, match="grads='dense'.*index, csr, gemm, triton"):
        with kernels.strategy(grads="dense"):
            pass
    assert kernels.current_strategy() == {"grads": "auto", "topk": "full"}


def test_auto_grads_is_gemm_on_cuda_only():
    """The default picks the H100's fastest kernels on CUDA and index_add on the CPU; an
    explicit choice wins everywhere."""
    assert kernels.grads_for(torch.device("cpu")) == "index"
    assert kernels.grads_for(torch.device("cuda")) == "gemm"
    with kernels.strategy(grads="csr"):
        assert kernels.grads_for(torch.device("cuda")) == "csr"


@requires_cuda
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("grads,topk", STRATEGIES, ids=["-".join(s) for s in STRATEGIES])
def test_strategies_match_dense_bf16_cuda(grads, topk, arch):
    """Every kernel strategy agrees with the dense reference on the GPU under bf16 (where
    ties are common: BatchTopK may break them differently, within the tolerance)."""
    require_grads(grads, "cuda")
    dev = torch.device("cuda")
    sae = make_sae(SAEConfig(arch, 256, 4096, k=32, seed=0)).to(dev)
    twin = copy.deepcopy(sae)
    x = torch.randn(1024, 256, device=dev)
    res = []
    for model, sparse in ((sae, True), (twin, False)):
        with kernels.use_sparse(sparse), kernels.strategy(grads, topk), \
                torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            loss = sum(model.loss(out, None).values())
        loss.float().backward()
        res.append((float(loss), model.W_enc.grad.float(), model.W_dec.grad.float()))
    (l_s, ge_s, gd_s), (l_d, ge_d, gd_d) = res
    assert l_s == pytest.approx(l_d, rel=2e-2)
    assert (ge_s - ge_d).norm() / ge_d.norm() < 3e-2
    assert (gd_s - gd_d).norm() / gd_d.norm() < 3e-2


def _flat_topk_positions(pre: torch.Tensor, total: int) -> list[int]:
    return sorted(pre.relu().flatten().topk(total).indices.tolist())


@pytest.mark.parametrize("sample", [1 << 18, 64])
def test_batchtopk_selection_is_exact(monkeypatch, sample):
    """The sampled-threshold selection gives exactly the flat top-(k*B) in row-major order:
    with the sample being every entry, a strided sample (stride > 1), a batch that one row
    dominates, and a sample that aimed too high (forced: the all-positives fallback)."""
    monkeypatch.setattr(batchtopk, "SAMPLE", sample)
    sae = make_sae(SAEConfig("batchtopk", 8, 64, k=2))
    for case in ("plain", "dominated", "aimed_high"):
        pre = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
        if case == "dominated":
            pre[3] += 10.0  # row 3 alone holds the 64 largest of the 128 kept values
        with monkeypatch.context() as m:
            if case == "aimed_high":
                m.setattr(batchtopk, "sample_threshold", lambda *a: 1e9)
            rows, cols = sae.select(pre, pre[:, :8])
        flat = (rows * 64 + cols).tolist()
        assert flat == _flat_topk_positions(pre, 128), case  # same set, row-major order
        if case == "dominated":
            assert int((rows == 3).sum()) == 64


def test_batchtopk_keeps_only_positive_entries():
    """Fewer positive pre-activations than k*B: exactly those are kept (zero codes would
    add nothing)."""
    sae = make_sae(SAEConfig("batchtopk", 8, 16, k=4))
    pre = torch.full((4, 16), -1.0)
    pre[0, 5], pre[2, 1], pre[2, 9] = 0.5, 2.0, 0.25
    rows, cols = sae.select(pre, pre[:, :8])
    assert rows.tolist() == [0, 2, 2] and cols.tolist() == [5, 1, 9]


def test_sample_stride_is_coprime_to_row_length():
    """Hand cases: 2^20 entries / 2^18 samples = stride 4, which shares a factor with rows
    of 1024, so 5 (a stride of 4 would only ever sample columns 0, 4, 8, ...)."""
    assert batchtopk.sample_stride(1 << 20, 1024) == 5
    assert batchtopk.sample_stride(3 << 18, 1000) == 3
    assert batchtopk.sample_stride(1000, 10) == 1


_COMPILE_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from paper_lib.sae import triton_kernels as tk
sigs = {
    tk._segment_rows_kernel: dict(x_ptr="*{dt}", rows_ptr="*i64", coef_ptr="*{dt}",
                                  seg_ptr="*i64", out_ptr="*fp32", d="i32", stride_x="i32",
                                  stride_out="i32", mean_run="i32"),
    tk._selected_dots_kernel: dict(a_ptr="*{dt}", b_ptr="*{dt}", rows_ptr="*i64",
                                   cols_ptr="*i64", out_ptr="*fp32", m="i32", stride_a="i32",
                                   stride_b="i32", D="constexpr"),
}
n = 0
for tuner, sig in sigs.items():
    for i, cfg in enumerate(tuner.configs):  # every candidate in bf16, the first in fp32 too
        for dt in ("bf16", "fp32") if i == 0 else ("bf16",):
            const = {**cfg.kwargs, **({"D": 768} if "D" in sig else {})}
            src = ASTSource(fn=tuner.fn, constexprs=const, signature={
                **{k: v.format(dt=dt) for k, v in sig.items()},
                **{k: "constexpr" for k in cfg.kwargs}})
            opts = {"num_warps": cfg.num_warps}
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
            assert "ld.global" in ptx
            n += 1
print("compiled", n)
"""


def test_triton_kernels_compile_for_h100():
    """Both kernels compile to H100 (sm_90) machine code under every configuration the
    autotuner may pick (bf16; the default also fp32), with no GPU here: Triton's own
    compiler, not its interpreter (a fresh process without TRITON_INTERPRET), so
    compiled-mode type errors show on the CPU."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset
    proc = subprocess.run([sys.executable, "-c", _COMPILE_H100], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled 26" in proc.stdout, proc.stderr[-3000:]


def test_autotuning_can_be_switched_off():
    """Outside the interpreter the autotuner holds every candidate, and with
    PAPER_LIB_TRITON_AUTOTUNE=0 only each kernel's default (the GPU test stage's setting:
    tuning every small test shape would cost more device time than the tests)."""
    pytest.importorskip("triton")
    code = ("from paper_lib.sae import triton_kernels as tk; "
            "print(len(tk._segment_rows_kernel.configs), len(tk._selected_dots_kernel.configs))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    counts = []
    for value in ("1", "0"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**env, "PAPER_LIB_TRITON_AUTOTUNE": value}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts.append(proc.stdout.split())
    assert counts == [["12", "12"], ["1", "1"]]
