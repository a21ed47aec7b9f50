"""Mamba-style selective scan: a diagonal linear recurrence with input-dependent dt, B, C.

Glossary (after Algorithm 2 of the Mamba paper; layout batch-first, time-major):

- ``x`` (B, T, E): the input channels (the paper's ``x`` / ``u``; E = expand * d_model).
- ``dt`` (B, T, E): the step size Delta, already positive (the layer applies softplus).
- ``A`` (E, N): the diagonal state matrix, negative entries (the layer stores ``log(-A)``).
- ``Bm``, ``Cm`` (B, T, N): input and output projections of the state, input-dependent.
- ``D`` (E,): the skip connection; ``z`` (B, T, E): optional output gate, applied as ``silu(z)``.
- ``h`` (B, E, N): the state, N numbers per channel.

Formula (zero-order-hold discretization of A, Euler for B, as in Mamba)::

    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t
    y_t = h_t C_t + D x_t,   y_t = y_t * silu(z_t)

Forms:

- :func:`selective_scan` — the chunked two-level scan (training/prefill). Time is cut into C chunks
  of L steps. (1) All chunks run their local scan from a zero state *at once*, stepping over the L
  positions (one vectorized update over ``(B, C, E, N)`` per position). (2) The chunk-boundary
  states are carried across the C chunks; a chunk's total decay is ``exp(A * sum dt)``, an
  exponent <= 0, so nothing overflows (unlike ``exp(-cumsum)`` tricks). (3) Each chunk is
  rescanned from its carried-in state, reading ``y_t = h_t C_t`` out step by step. Python steps
  drop from T to ``2L + C``; the work stays O(T E N) and no ``(B, T, E, N)`` tensor is built in the
  forward. On CPU this scan is bound by elementwise throughput and cache, not by Python, so C is
  chosen (:func:`auto_chunk`) to keep one step's ``(B, C, E, N)`` working set in cache.
  It is a custom autograd function: forward saves only its inputs and the ``(B, C, E, N)``
  boundary states; backward recomputes the states and runs the adjoint recurrence with the same
  chunked schedule (formulas in :class:`_SelectiveScan`), so training memory is one transient
  ``(B, T, E, N)`` tensor instead of a dozen saved ones, and it is several times faster than
  differentiating the loop. Uses ``mamba-ssm`` on CUDA when importable; a carried-in state (which the
  kernel cannot take) adds its closed-form term :func:`state_term`.
- :func:`selective_scan_step` — one decoding step with the ``(E, N)`` state.
- :func:`selective_scan_ref` — the recurrence as a plain loop over time (the test reference).

All return ``(y, final_state)`` in ``x``'s dtype, so a chunked prefill followed by recurrent steps
equals one call. ``A`` may stay float32 under a bf16/fp16 model (mamba-ssm's convention): the
scan then runs in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from taskmoe.ops import kernels


def _init_state(x: Tensor, A: Tensor, state: Tensor | None) -> Tensor:
    shape = (x.shape[0], A.shape[0], A.shape[1])
    if state is None:
        return x.new_zeros(shape)
    if state.shape != shape:
        raise ValueError(f"selective_scan: state has shape {tuple(state.shape)}, expected {shape}")
    return state


def _finish(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + x * D
    if z is not None:
        y = y * F.silu(z)
    return y


STEP_ELEMENTS = 1 << 17  # per-step working set of the chunked scan: 128K floats = 512 KB in fp32


def auto_chunk(T: int, state_elements: int) -> int:
    """Chunk length L for T steps when one step touches ``state_elements = B * E * N`` numbers.

    Python steps are ``2L + C`` with ``C = T / L`` chunks, smallest at ``C ~ sqrt(2T)``; but every
    step updates ``C * state_elements`` numbers at once, and once that leaves the cache the scan
    is memory-bound and chunking stops paying. So C is the smaller of the two.
    """
    chunks = max(1, min(STEP_ELEMENTS // max(1, state_elements), math.isqrt(2 * T)))
    return math.ceil(T / chunks)


def _chunked(t: Tensor, n_chunks: int, L: int) -> Tensor:
    """(B, T, *) -> (B, n_chunks, L, *), zero-padding the tail of the time axis."""
    pad = n_chunks * L - t.shape[1]
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], n_chunks, L, *t.shape[2:])


def _step_terms(dt: Tensor, x: Tensor, A: Tensor, Bm: Tensor, i: int) -> tuple[Tensor, Tensor]:
    """Decay ``a_i = exp(dt_i A)`` and input ``u_i = (dt_i x_i) B_i`` of step i, each (B, C, E, N).

    Built per step from the small (B, C, L, E) / (B, C, L, N) inputs rather than materialized for
    all steps: the per-step working set stays in cache, which is what bounds this scan on CPU.
    """
    return torch.exp(dt[:, :, i, :, None] * A), (dt[:, :, i] * x[:, :, i]).unsqueeze(-1) * Bm[:, :, i, None, :]


def _carry(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Passes (1) and (2): chunk-local scans from zero, then the states entering each chunk.

    Inputs chunked as (B, C, L, *). Returns ``h_in`` (B, C, E, N) and the final state. The decay
    across a whole chunk is ``exp(A * sum_l dt_l)`` (no per-step product needed).
    """
    h = _step_terms(dt, x, A, Bm, 0)[1]
    for i in range(1, x.shape[2]):
        a_i, u_i = _step_terms(dt, x, A, Bm, i)
        h = a_i * h + u_i
    chunk_decay = torch.exp(dt.sum(2).unsqueeze(-1) * A)  # (B, C, E, N)
    carried, state = [], h0
    for c in range(x.shape[1]):
        carried.append(state)
        state = chunk_decay[:, c] * state + h[:, c]
    return torch.stack(carried, dim=1), state


def _states(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, h_in: Tensor) -> Tensor:
    """Pass (3) for the backward: every state ``h_t`` (B, C, L, E, N), chunks scanned from ``h_in``."""
    h, out = h_in, []
    for i in range(x.shape[2]):
        a_i, u_i = _step_terms(dt, x, A, Bm, i)
        h = a_i * h + u_i
        out.append(h)
    return torch.stack(out, dim=2)


def _readout(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h_in: Tensor) -> tuple[Tensor, Tensor]:
    """Pass (3) for the forward: ``y_t = h_t C_t`` (B, C, L, E) read out step by step (no state stored).

    Returns y and the states after each chunk's last step (B, C, E, N).
    """
    y = x.new_empty(x.shape)
    h = h_in
    for i in range(x.shape[2]):
        a_i, u_i = _step_terms(dt, x, A, Bm, i)
        h = a_i * h + u_i
        y[:, :, i] = (h @ Cm[:, :, i, :, None]).squeeze(-1)
    return y, h


class _SelectiveScan(torch.autograd.Function):
    """The scan ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = h_t C_t`` with a recomputing backward.

    Forward keeps only the inputs and the chunk-boundary states (B, C, E, N); backward recomputes
    the states and runs the adjoint recurrence ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` with the same
    chunked schedule (local reverse scans, carry right-to-left, rescan), accumulating per step::

        d(dt x)_t = g_t B_t          dB_t = sum_e g_t (dt x)_t        dC_t = sum_e dy_t h_t
        dlog a_t  = g_t h_{t-1} a_t  d dt_t += sum_n dlog a_t A       dA += sum_bt dlog a_t dt_t
        dh_0      = a_1 g_1
    """

    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, h0, L):
        Bsz, T, E = x.shape
        C = math.ceil(T / L)
        xc, dtc, Bc, Cc = (_chunked(t, C, L) for t in (x, dt, Bm, Cm))
        if C == 1:  # one chunk: its carried-in state is h0, no local pre-scan needed
            h_in = h0.unsqueeze(1)  # (B, 1, E, N)
            y, h_end = _readout(xc, dtc, A, Bc, Cc, h_in)
            h_last = h_end[:, 0]
        else:
            h_in, h_last = _carry(xc, dtc, A, Bc, h0)
            y, _ = _readout(xc, dtc, A, Bc, Cc, h_in)  # (B, C, L, E)
        ctx.save_for_backward(x, dt, A, Bm, Cm, h_in)
        ctx.L = L
        return y.reshape(Bsz, C * L, E)[:, :T], h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_last):
        x, dt, A, Bm, Cm, h_in = ctx.saved_tensors
        L, (Bsz, T, E) = ctx.L, x.shape
        C = h_in.shape[1]
        xc, dtc, Bc, Cc = (_chunked(t, C, L) for t in (x, dt, Bm, Cm))
        dyc = _chunked(dy, C, L)  # (B, C, L, E)
        dtx = dtc * xc
        H = _states(xc, dtc, A, Bc, h_in)  # (B, C, L, E, N): forward states, recomputed
        decay = lambda i: torch.exp(dtc[:, :, i, :, None] * A)  # noqa: E731 - a_i, (B, C, E, N)
        out = lambda i: dyc[:, :, i, :, None] * Cc[:, :, i, None, :]  # noqa: E731 - C_i dy_i
        # adjoint entering each chunk from the right: local reverse scans, then carry leftwards
        r = torch.zeros_like(h_in[:, 0]) if dh_last is None else dh_last
        right = [r] * C
        if C > 1:
            g = out(L - 1)
            for i in reversed(range(L - 1)):
                g = out(i) + decay(i + 1) * g
            left = decay(0) * g  # (B, C, E, N): what chunk c alone sends to chunk c-1
            chunk_decay = torch.exp(dtc.sum(2).unsqueeze(-1) * A)
            for c in reversed(range(C)):
                right[c] = r
                r = left[:, c] + chunk_decay[:, c] * r
        # rescan right-to-left with the true adjoints
        d_dtx = torch.empty_like(dtx)
        dB = torch.empty_like(Bc)
        d_dt = torch.empty_like(dtc)
        dA = torch.zeros_like(A)
        g = torch.stack(right, dim=1)  # (B, C, E, N): adjoint arriving from the next chunk
        a_next = None
        for i in reversed(range(L)):
            a_i = decay(i)
            g = out(i) + (g if a_next is None else a_next * g)
            d_dtx[:, :, i] = (g @ Bc[:, :, i, :, None]).squeeze(-1)
            dB[:, :, i] = (dtx[:, :, i, None, :] @ g).squeeze(-2)
            h_prev = H[:, :, i - 1] if i else h_in
            dlog_a = g * h_prev * a_i  # (B, C, E, N)
            d_dt[:, :, i] = (dlog_a * A).sum(-1)
            dA += (dlog_a * dtc[:, :, i, :, None]).sum((0, 1))
            a_next = a_i
        dh0 = a_next * g  # the adjoint sent to the state before the first step of each chunk
        dh0 = dh0[:, 0]
        dC = (dyc.unsqueeze(-2) @ H).squeeze(-2)  # (B, C, L, N)
        d_dt = d_dt + d_dtx * xc
        dx = d_dtx * dtc
        trim = lambda t: t.reshape(Bsz, C * L, *t.shape[3:])[:, :T]  # noqa: E731
        return trim(dx), trim(d_dt), dA, trim(dB), trim(dC), dh0, None


def _in_compute_dtype(x: Tensor, A: Tensor, *ts: Tensor | None) -> tuple[Tensor | None, ...]:
    """``A`` and ``ts`` in ``promote(x.dtype, A.dtype)``: with A kept in float32 (as mamba-ssm keeps it), a
    bf16/fp16 model scans in float32, like mamba-ssm's own reference (``u.float()``, ...)."""
    ct = torch.promote_types(x.dtype, A.dtype)
    return tuple(None if t is None else t.to(ct) for t in (A, *ts))


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    state: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked two-level scan: ``(y (B, T, E), h (B, E, N))``; ``chunk_size`` None = :func:`auto_chunk`.

    ``y`` and ``h`` come back in ``x``'s dtype; the scan itself runs in ``promote(x.dtype, A.dtype)``.
    """
    fused = kernels.kernel("selective_scan", x, dt, A, Bm, Cm, state)
    if fused is not None:
        return _fused_scan(fused, x, dt, A, Bm, Cm, D, z, state)
    T = x.shape[1]
    h0 = _init_state(x, A, state)
    if T == 0:
        return _finish(x.new_zeros(x.shape), x, D, z), h0
    A_, x_, dt_, Bm_, Cm_, h0_, D_, z_ = _in_compute_dtype(x, A, x, dt, Bm, Cm, h0, D, z)
    L = max(1, min(chunk_size or auto_chunk(T, x.shape[0] * A.numel()), T))
    y, h = _SelectiveScan.apply(x_, dt_, A_, Bm_, Cm_, h0_, L)
    return _finish(y, x_, D_, z_).to(x.dtype), h.to(x.dtype)


STATE_CHUNK = 256  # time steps per slice of the state term: bounds its (B, L, E, N) transient


def state_term(h0: Tensor, dt: Tensor, A: Tensor, Cm: Tensor) -> tuple[Tensor, Tensor]:
    """What an initial state ``h0`` (B, E, N) adds to a scan, in closed form (the recurrence is linear in h):

    ``h_t = h_t(from zero) + exp(A * s_t) h0`` and ``y_t += (exp(A * s_t) h0) C_t`` with ``s_t = sum_{u<=t} dt_u``
    (every exponent <= 0). Returns ``(y_h0 (B, T, E), decay_T * h0 (B, E, N))`` in float32.
    """
    A32, h32 = A.float(), h0.float()
    s = dt.float().cumsum(1)  # (B, T, E)
    ys = [torch.einsum("bten,ben,btn->bte", torch.exp(s[:, a : a + STATE_CHUNK, :, None] * A32), h32,
                       Cm[:, a : a + STATE_CHUNK].float()) for a in range(0, s.shape[1], STATE_CHUNK)]
    y = torch.cat(ys, 1) if ys else s.new_zeros(s.shape)
    return y, torch.exp(s[:, -1, :, None] * A32) * h32 if s.shape[1] else h32


def _fused_scan(fused, x, dt, A, Bm, Cm, D, z, state):  # noqa: ANN001, ANN202 - the mamba-ssm call
    """mamba-ssm's kernel in its layout (module docstring of :mod:`taskmoe.ops.kernels`); a carried-in
    state adds :func:`state_term` (the kernel itself always starts from zero)."""
    y, h = fused(
        x.transpose(1, 2), dt.transpose(1, 2), A.float(), Bm.transpose(1, 2), Cm.transpose(1, 2),
        None if D is None else D.float(), None if z is None else z.transpose(1, 2), return_last_state=True,
    )  # (B, E, T), (B, E, N)
    y = y.transpose(1, 2)  # (B, T, E)
    if state is not None:
        _init_state(x, A, state)
        y_s, h_s = state_term(state, dt, A, Cm)
        gate = F.silu(z.float()) if z is not None else 1.0
        y = y.float() + y_s * gate
        h = h.float() + h_s
    return y.to(x.dtype), h.to(x.dtype)


def selective_scan_step(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step: ``x``, ``dt``, ``z`` (B, E), ``Bm``, ``Cm`` (B, N) -> ``(y (B, E), h (B, E, N))``."""
    A_, x_, dt_, Bm_, Cm_, h_, D_, z_ = _in_compute_dtype(x, A, x, dt, Bm, Cm, _init_state(x, A, state), D, z)
    h = torch.exp(dt_.unsqueeze(-1) * A_) * h_ + (dt_ * x_).unsqueeze(-1) * Bm_.unsqueeze(1)  # (B, E, N)
    y = (h @ Cm_.unsqueeze(-1)).squeeze(-1)  # (B, E)
    return _finish(y, x_, D_, z_).to(x.dtype), h.to(x.dtype)


def selective_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference twin: ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t; y_t = h_t C_t`` as a loop."""
    A_, x_, dt_, Bm_, Cm_, h, D_, z_ = _in_compute_dtype(x, A, x, dt, Bm, Cm, _init_state(x, A, state), D, z)
    ys = []
    for t in range(x.shape[1]):
        dA = torch.exp(torch.einsum("be,en->ben", dt_[:, t], A_))
        dBx = torch.einsum("be,bn->ben", dt_[:, t] * x_[:, t], Bm_[:, t])
        h = dA * h + dBx
        ys.append(torch.einsum("ben,bn->be", h, Cm_[:, t]))
    y = torch.stack(ys, dim=1) if ys else x_.new_zeros(x.shape)
    return _finish(y, x_, D_, z_).to(x.dtype), h.to(x.dtype)
