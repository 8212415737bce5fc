"""Model files: every file regprune writes loads again (any header length, unwrapped parameters, any conv)."""

import json
import struct

import pytest
import torch
import torch.nn as nn

import regprune
from regprune.errors import UserError
from regprune.graph import analyze
from regprune.surgery import apply_picks, describe, load_model, save_model

pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


class ChannelShift(nn.Module):
    """conv -> + per-channel parameter (1, C, 1, 1) -> relu -> conv -> pool -> layer scale (C,) -> linear."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(1, c, 1, 1))
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.scale = nn.Parameter(torch.rand(c) + 0.5)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x) + self.shift)
        x = torch.relu(self.bn(self.c2(x)))
        return self.fc(x.mean((2, 3)) * self.scale)


class Tokens(nn.Module):
    """Patch embedding + positional embedding (1, N, C), LayerNorm, a layer scale (C,), an MLP with PReLU."""

    def __init__(self, c: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, c, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 4, c))
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.act = nn.PReLU(hidden, init=0.1)
        self.fc2 = nn.Linear(hidden, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, 4, C)
        v = (self.gamma * self.norm(t)).mean(1)  # (B, C)
        return self.head(self.fc2(self.act(self.fc1(v))))


class Seq1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 6, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.gn(self.c2(x)))
        return self.fc(x.mean(2))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.up(torch.relu(self.c1(x))))))


def _seeded(cls, seed=0):
    torch.manual_seed(seed)
    model = cls()
    for m in model.modules():  # non-trivial BN statistics, so a wrong channel would show
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def _round_trip(pruned: nn.Module, cls, x: torch.Tensor, tmp_path) -> nn.Module:
    path = save_model(pruned, tmp_path / "m.safetensors")
    loaded, _ = regprune.load(path, model=_seeded(cls, seed=1))
    _same_outputs(pruned, loaded, x)
    for (n, p), (m, q) in zip(pruned.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(p, q), n
    return loaded


# ---- Task A.1: the safetensors header length may start with any byte

def _rewrite_header(data: bytes, length: int) -> bytes:
    """The same safetensors file with its JSON header padded by spaces to `length` bytes (valid for the format)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].rstrip(b" ")
    assert length >= len(header)
    return struct.pack("<Q", length) + header + b" " * (length - len(header)) + data[8 + n:]


def test_saved_files_load_whatever_their_first_byte(tmp_path):
    model = Tiny()
    seen = {}
    for pad in range(0, 8 * 40):
        path = save_model(model, tmp_path / "m.safetensors", {"pad": "x" * pad})
        first = path.read_bytes()[0]
        if first in seen:
            continue
        seen[first] = pad
        loaded, meta = load_model(path, model=Tiny())
        assert meta["pad"] == "x" * pad
        assert torch.equal(loaded.fc.weight, model.fc.weight)
    # the writer pads the header to 8 bytes: every multiple of 8 is a possible first byte, 0x80 among them
    assert set(seen) == set(range(0, 256, 8))
    assert 0x80 in seen


def test_every_first_byte_0x00_to_0xff_loads(tmp_path):
    model = Tiny()
    data = save_model(model, tmp_path / "m.safetensors").read_bytes()
    base = struct.unpack("<Q", data[:8])[0]
    for first in range(256):
        length = base + (first - base) % 256
        path = tmp_path / f"h{first}.safetensors"
        path.write_bytes(_rewrite_header(data, length))
        assert path.read_bytes()[0] == first
        loaded, _ = load_model(path, model=Tiny())
        assert torch.equal(loaded.fc.bias, model.fc.bias), first


def test_pickles_refused_with_a_real_hint_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    zipped = tmp_path / "evil.safetensors"
    torch.save({"state": Payload()}, zipped)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1), "p": Payload()}, legacy, _use_new_zipfile_serialization=False)
    assert zipped.read_bytes()[:2] == b"PK" and legacy.read_bytes()[:1] == b"\x80"
    for bad in (zipped, legacy):
        with pytest.raises(UserError, match="pickle") as err:
            load_model(bad, model=Tiny())
        assert "regprune.save(model, path)" in str(err.value)
        assert "regprune import" not in str(err.value)
        assert "\n" not in str(err.value)
    assert hasattr(regprune, "save")  # the hint names the public API
    assert not marker.exists()


def test_garbage_is_not_called_a_pickle(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x81" + bytes(40))
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_model(junk, model=Tiny())
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x80\x04")  # starts like a pickle and is no safetensors file
    with pytest.raises(UserError, match="pickle"):
        load_model(short, model=Tiny())


# ---- Task A.2: unwrapped parameters, any conv, any norm

def test_per_channel_parameter_and_layer_scale_round_trip(tmp_path):
    model = _seeded(ChannelShift)
    x = torch.randn(2, 3, 8, 8)
    g = analyze(model, x, include_coupled=True)
    apply_picks(g, {"c1": [0, 3, 5], "c2": [1, 2]})
    assert model.shift.shape == (1, 5, 1, 1) and model.scale.shape == (6,)
    loaded = _round_trip(model, ChannelShift, x, tmp_path)
    assert loaded.shift.shape == (1, 5, 1, 1) and loaded.bn.num_features == 6


def test_regprune_prune_with_unwrapped_parameters_round_trip(tmp_path):
    model = _seeded(ChannelShift)
    x = torch.randn(2, 3, 8, 8)
    pruned = regprune.prune(model, x, ratios="0.5", include_coupled=True).model
    assert pruned.shift.shape[1] < 8 and pruned.scale.shape[0] < 8
    _round_trip(pruned, ChannelShift, x, tmp_path)


def test_positional_embedding_layernorm_prelu_round_trip(tmp_path):
    model = _seeded(Tokens)
    x = torch.randn(2, 3, 8, 8)
    g = analyze(model, x, include_coupled=True)
    # a LayerNorm over pruned channels changes its statistics, so the check would refuse this cut as not exact;
    # the file must still hold whatever the surgery made
    apply_picks(g, {"patch": [1, 6], "fc1": [0, 2, 3, 9]}, verify=False)
    assert model.pos.shape == (1, 4, 6) and model.norm.normalized_shape == (6,) and model.act.num_parameters == 12
    loaded = _round_trip(model, Tokens, x, tmp_path)
    assert loaded.norm.normalized_shape == (6,) and loaded.act.num_parameters == 12
    assert loaded.fc1.in_features == 6 and loaded.fc1.out_features == 12


def test_conv1d_grouped_and_groupnorm_round_trip(tmp_path):
    model = _seeded(Seq1d)
    x = torch.randn(2, 2, 10)
    g = analyze(model, x, include_coupled=True)
    apply_picks(g, {"c1": [0, 4]})  # same position in each of c2's two input blocks
    assert model.c2.in_channels == 6 and model.bn.num_features == 6
    loaded = _round_trip(model, Seq1d, x, tmp_path)
    assert (loaded.c1.out_channels, loaded.c2.in_channels, loaded.c2.groups) == (6, 6, 2)


def test_conv_transpose_round_trip(tmp_path):
    model = _seeded(Decoder)
    x = torch.randn(2, 3, 6, 6)
    g = analyze(model, x, include_coupled=True)
    apply_picks(g, {"c1": [2, 7], "up": [0, 4, 5]})
    assert model.up.weight.shape == (6, 3, 2, 2)  # transposed: (in, out/groups, k, k)
    loaded = _round_trip(model, Decoder, x, tmp_path)
    assert (loaded.up.in_channels, loaded.up.out_channels) == (6, 3)


def test_files_written_before_widths_were_recorded_still_load(tmp_path):
    model = _seeded(Decoder)
    x = torch.randn(2, 3, 6, 6)
    apply_picks(analyze(model, x, include_coupled=True), {"c1": [1], "up": [2]})
    data = save_model(model, tmp_path / "m.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    desc = json.loads(header["__metadata__"]["regprune"])
    del desc["widths"]
    header["__metadata__"]["regprune"] = json.dumps(desc)
    body = json.dumps(header).encode()
    old = tmp_path / "old.safetensors"
    old.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])
    loaded, _ = load_model(old, model=_seeded(Decoder, seed=1))
    _same_outputs(model, loaded, x)


def test_shapes_pruning_cannot_explain_are_refused(tmp_path):
    model = _seeded(ChannelShift)
    x = torch.randn(2, 3, 8, 8)
    apply_picks(analyze(model, x, include_coupled=True), {"c1": [0, 3]})
    path = save_model(model, tmp_path / "m.safetensors")

    wider = ChannelShift(c=8)
    wider.c2 = nn.Conv2d(8, 8, 5, padding=2)  # c2 was touched, but pruning never changes a kernel size
    with pytest.raises(UserError, match="c2.weight"):
        load_model(path, model=wider)

    class Extra(ChannelShift):
        def __init__(self) -> None:
            super().__init__()
            self.aux = nn.Linear(5, 5)

    with_aux = _seeded(Extra)
    model.aux = nn.Linear(4, 4)  # an untouched layer whose shape differs from the architecture's
    path = save_model(model, tmp_path / "aux.safetensors")
    with pytest.raises(UserError, match="aux.weight"):
        load_model(path, model=with_aux)


def test_file_wider_than_the_architecture_is_refused(tmp_path):
    model = _seeded(ChannelShift)
    x = torch.randn(2, 3, 8, 8)
    apply_picks(analyze(model, x, include_coupled=True), {"c1": [0]})
    path = save_model(model, tmp_path / "m.safetensors")
    small = ChannelShift(c=6)  # every file tensor is larger than this architecture's: nothing pruning makes
    with pytest.raises(UserError, match="does not fit the model"):
        load_model(path, model=small)


def test_unwrapped_parameter_cut_along_two_dims_is_refused(tmp_path):
    model = _seeded(Tokens)
    x = torch.randn(2, 3, 8, 8)
    apply_picks(analyze(model, x, include_coupled=True), {"patch": [1, 6]}, verify=False)
    assert "" in describe(model)["pruned"]  # the model owns pos and gamma: it may differ from the architecture
    model.pos = nn.Parameter(torch.randn(1, 2, 6))  # but no cut shortens both N and C
    path = save_model(model, tmp_path / "m.safetensors")
    with pytest.raises(UserError, match=r"pos \(1, 2, 6\) vs \(1, 4, 8\)"):
        load_model(path, model=_seeded(Tokens, seed=1))
