"""The one code-packing layout (`edkm.functional.packing`) and nearest-centroid codes."""

from __future__ import annotations

import math

import pytest
import torch

from edkm.functional import assign_codes
from edkm.functional.packing import nearest, pack_codes, unpack_codes


def _reference_stream(codes: torch.Tensor, bits: int) -> list[int]:
    """Bytes of the export's format-1 layout, built bit by bit in Python (independent of torch)."""
    stream = []
    for c in codes.tolist():
        stream.extend((c >> b) & 1 for b in range(bits))
    stream.extend([0] * (-len(stream) % 8))
    return [sum(bit << k for k, bit in enumerate(stream[i : i + 8])) for i in range(0, len(stream), 8)]


def test_layout_is_lsb_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x07]]
    # 3-bit: 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 = 0x1F58D1
    assert pack_codes(codes, 3).tolist() == [[0xD1, 0x58, 0x1F]]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_rows_pack_as_the_export_bit_stream(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(bits * n))
    packed = pack_codes(codes.view(1, -1), bits)[0]
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8) * bits
    need = math.ceil(n * bits / 8)
    assert packed.tolist()[:need] == _reference_stream(codes, bits)
    assert not packed[need:].any(), "the bytes the export drops must be zero padding"
    assert torch.equal(unpack_codes(packed[:need].view(1, -1), bits, n)[0], codes.to(torch.uint8))
    assert torch.equal(unpack_codes(packed.view(1, -1), bits, n)[0], codes.to(torch.uint8))


def test_groups_pack_independently():
    c = torch.randint(0, 8, (3, 21), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(c, 3)
    assert packed.shape == (3, 9)
    for g in range(3):
        assert torch.equal(packed[g], pack_codes(c[g : g + 1], 3)[0])
    assert torch.equal(unpack_codes(packed, 3, 21), c.to(torch.uint8))


@pytest.mark.parametrize("bad,match", [(torch.tensor([[0, 8]]), r"\[0, 7\] for 3 bits, got \[0, 8\]"),
                                       (torch.tensor([[-1, 0]]), r"got \[-1, 0\]")])
def test_pack_rejects_out_of_range(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_codes(bad, 3)


def test_pack_and_unpack_reject_bad_arguments():
    with pytest.raises(ValueError, match="got 9"):
        pack_codes(torch.zeros(1, 8, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        pack_codes(torch.zeros(8, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="need 3 to 3 bytes per row, got 2"):
        unpack_codes(torch.zeros(1, 2, dtype=torch.uint8), 3, 8)


def test_nearest_breaks_ties_to_the_lowest_index():
    points = torch.tensor([[[0.25], [0.0], [0.5], [0.3]]])
    centroids = torch.tensor([[[0.125], [0.375], [0.0], [0.0]]])
    assert nearest(points, centroids).tolist() == [[0, 2, 1, 1]]


def test_assign_codes_is_nearest_then_pack():
    gen = torch.Generator().manual_seed(1)
    points = (torch.randn(2, 37, 1, generator=gen) * 0.02).to(torch.bfloat16)
    centroids = torch.randn(2, 8, 1, generator=gen) * 0.02
    codes = assign_codes(points, centroids, 3, backend="torch")
    assert torch.equal(codes, pack_codes(nearest(points, centroids), 3))
    dist = (points.float() - centroids.transpose(1, 2)).abs()  # (G, N, K)
    got = unpack_codes(codes, 3, 37).long()
    assert torch.equal(dist.gather(2, got.unsqueeze(-1))[..., 0], dist.min(-1).values)
    with pytest.raises(ValueError, match="K <= 2\\*\\*bits, got bits=2, K=8"):
        assign_codes(points, centroids, 2, backend="torch")


@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nearest_is_the_argmin_of_squared_differences(dtype, path, monkeypatch):
    from edkm import ckernels
    from edkm.functional import packing
    from edkm.functional.iterations import sq_dist

    if path == "c" and not ckernels.available():
        pytest.skip(f"C kernels unavailable: {ckernels.build_error()}")
    calls = []
    if path == "torch":
        monkeypatch.setattr(packing, "_c_nearest_applies", lambda p, c: False)
    else:
        real = ckernels.c_nearest
        monkeypatch.setattr(ckernels, "c_nearest", lambda p, c: calls.append(1) or real(p, c))

    gen = torch.Generator().manual_seed(0)
    c = (torch.randn(6, 16, 1, generator=gen) * 0.02).to(dtype).float()
    c[1, 5] = c[1, 2]  # duplicated centroids: the lower index wins
    c[1, 9] = c[1, 2]
    c[2] = c[2, :1]  # one group of 16 equal centroids
    c[3, 3:6] = c[3, 10]  # a run of three equal to a later one
    x = (torch.randn(6, 5000, 1, generator=gen) * 0.03).to(dtype)
    x[:, :16] = c[:, :, :].to(dtype)  # points exactly on centroids
    mids = (c[:, :-1] + c[:, 1:]) / 2
    x[:, 16:31] = mids.to(dtype)  # points on (rounded) midpoints of index neighbours
    cs = c.sort(1).values
    x[:, 31:46] = ((cs[:, :-1] + cs[:, 1:]) / 2).to(dtype)  # and of value neighbours
    x[:, 46:61] = ((cs[:, :-1] + cs[:, 1:]) / 2).nextafter(cs[:, 1:]).to(dtype)  # one step above
    want = sq_dist(x.float(), c).argmin(-1)
    assert torch.equal(nearest(x, c), want)
    assert torch.equal(nearest(x[:, :7], c[:, :1]), torch.zeros(6, 7, dtype=torch.int64))  # K = 1
    assert len(calls) == (2 if path == "c" else 0)  # the C kernel served the CPU fp32-centroid case
