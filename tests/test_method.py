"""TrAct's gradients against a float64 closed form written here (explicit patches + torch.linalg.inv), and the
module's contract: same forward, same Parameters and state_dict keys, apply/remove, errors, AMP, compile."""
import copy
import itertools
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tract.method
from tract import TrAct, apply_tract, find_first_layer, remove_tract


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: unfold by slicing the padded input at every kernel offset, then the paper's Figure 2.

def _pad_pairs(conv: nn.Module, spatial: tuple) -> list:
    """(left, right) padding per spatial dim, from the layer's constructor arguments (not its internals)."""
    if conv.padding == "valid":
        return [(0, 0)] * len(spatial)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in conv.padding]


def reference_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """X as a float64 (b, n) matrix: input rows of a Linear, patches of a convolution (channel-major, like W)."""
    x = x.detach().double()
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    dims = x.dim() - 2
    pads = _pad_pairs(layer, x.shape[2:])
    flat = [p for pair in reversed(pads) for p in pair]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    xp = F.pad(x, flat, mode=mode)
    out = [(xp.shape[2 + i] - layer.dilation[i] * (layer.kernel_size[i] - 1) - 1) // layer.stride[i] + 1
           for i in range(dims)]
    cols = []
    for offset in itertools.product(*(range(k) for k in layer.kernel_size)):
        index = tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                      for o, d, s, n in zip(offset, layer.dilation, layer.stride, out))
        cols.append(xp[(slice(None), slice(None), *index)])  # (B, C, *out)
    patches = torch.stack(cols, dim=2)  # (B, C, K, *out)
    patches = patches.permute(0, *range(3, 3 + dims), 1, 2)  # (B, *out, C, K)
    return patches.reshape(-1, patches.shape[-2] * patches.shape[-1])


def reference_grads(layer: nn.Module, x: torch.Tensor, grad_z: torch.Tensor, lam: float):
    """(ordinary, TrAct) weight gradients in float64, shaped like the weight."""
    rows = reference_rows(layer, x)
    gz = grad_z.detach().double()
    gz = gz.reshape(-1, gz.shape[-1]) if isinstance(layer, nn.Linear) else gz.movedim(1, -1).reshape(-1, gz.shape[1])
    b = rows.shape[0]
    groups = getattr(layer, "groups", 1)
    m_g, n_g = gz.shape[1] // groups, rows.shape[1] // groups
    ordinary, tract = [], []
    for g in range(groups):
        xg, zg = rows[:, g * n_g:(g + 1) * n_g], gz[:, g * m_g:(g + 1) * m_g]
        gw = zg.T @ xg
        ordinary.append(gw)
        tract.append(gw @ torch.linalg.inv(xg.T @ xg / b + lam * torch.eye(n_g, dtype=torch.float64)))
    shape = layer.weight.shape
    return torch.cat(ordinary).reshape(shape), torch.cat(tract).reshape(shape)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Relative error in Frobenius norm: rounding in float32/bf16 is relative to the whole gradient's scale."""
    error = (actual.double() - expected).norm() / expected.norm()
    assert error < tol, f"relative error {error:.2e} > {tol:.0e}"


GRAD_LAYOUTS = ["contiguous_grad", "channels_last_grad", "class_token_sliced_grad"]


def lay_out(grad_z: torch.Tensor, layout: str) -> torch.Tensor:
    """grad_z's values in the memory layout a first layer receives from what follows it."""
    if layout == "contiguous_grad":
        return grad_z
    cl = grad_z.movedim(1, -1)  # a ViT's patch embedding: its output is flattened and transposed
    if layout == "channels_last_grad":
        return cl.contiguous().movedim(-1, 1)
    # ... and then often sliced past the class token: items channels-last, but not adjacent to each other
    channels = cl.shape[-1]
    buffer = torch.zeros(cl.shape[0], cl[0].numel() + channels, dtype=grad_z.dtype)
    buffer[:, channels:] = cl.flatten(1)
    return buffer[:, channels:].view(cl.shape).movedim(-1, 1)


def run_both(make_layer, x_shape, lam=0.1, dtype=torch.float64, transpose_input=False, grad_layout="contiguous_grad",
             seed=0):
    """Plain layer and its TrAct twin (same initial values) on the same input and upstream gradient."""
    torch.manual_seed(seed)
    plain = make_layer().to(dtype)
    tract_layer = TrAct(copy.deepcopy(plain), lam)
    x = torch.randn(x_shape, dtype=dtype)
    if transpose_input:
        x = x.transpose(0, 1)  # non-contiguous
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    z1, z2 = plain(x1), tract_layer(x2)
    grad_z = lay_out(torch.randn_like(z1), grad_layout)
    z1.backward(grad_z)
    z2.backward(grad_z)
    return plain, tract_layer, x, x1, x2, z1, z2, grad_z


CASES = {
    "conv1d_stride2_pad1": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 11)),
    "conv2d_3x3_cifar_stem": (lambda: nn.Conv2d(3, 8, 3, padding=1), (2, 3, 8, 8)),
    "conv2d_patch_embed": (lambda: nn.Conv2d(3, 6, 4, stride=4), (2, 3, 12, 12)),
    "conv2d_patch_embed_cropped": (lambda: nn.Conv2d(3, 6, 4, stride=4), (2, 3, 13, 14)),
    "conv2d_7x7_stride2_no_bias": (lambda: nn.Conv2d(3, 4, 7, stride=2, padding=3, bias=False), (2, 3, 12, 12)),
    "conv2d_tuple_kernel_stride_padding": (lambda: nn.Conv2d(2, 4, (3, 5), stride=(2, 1), padding=(1, 2)),
                                           (2, 2, 9, 8)),
    "conv2d_same_even_kernel": (lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 7, 6)),
    "conv2d_same_dilated": (lambda: nn.Conv2d(2, 3, 3, padding="same", dilation=2), (2, 2, 7, 7)),
    "conv2d_valid": (lambda: nn.Conv2d(2, 3, 3, padding="valid"), (2, 2, 7, 7)),
    "conv2d_dilation_stride": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2), (2, 2, 11, 9)),
    "conv2d_groups": (lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3), (2, 6, 6, 6)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 7, 7)),
    "conv2d_replicate": (lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="replicate"), (2, 3, 7, 7)),
    "conv2d_circular_same": (lambda: nn.Conv2d(3, 4, 4, padding="same", padding_mode="circular"), (2, 3, 7, 7)),
    "conv3d_groups_stride": (lambda: nn.Conv3d(4, 6, (2, 3, 3), stride=(1, 2, 2), padding=1, groups=2),
                             (2, 4, 4, 6, 6)),
    "linear_3d_input": (lambda: nn.Linear(6, 5), (4, 3, 6)),
    "linear_symmetric_gram_odd_n": (lambda: nn.Linear(261, 3), (300, 261)),  # n >= 256: Gram from half blocks
    "conv2d_symmetric_gram": (lambda: nn.Conv2d(3, 4, (9, 10), stride=(9, 10)), (3, 3, 90, 100)),  # n = 270
    "woodbury_conv_b_lt_n": (lambda: nn.Conv2d(3, 5, 8, stride=8), (1, 3, 16, 16)),  # b = 4, n = 192
    "woodbury_linear_b_lt_n": (lambda: nn.Linear(40, 3), (2, 3, 40)),  # b = 6, n = 40
}


# torch warns that 'same' with an even kernel pads a copy of the input; that case is tested on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


@pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_weight_grad_matches_float64_closed_form(case, grad_layout):
    make_layer, shape = CASES[case]
    plain, tract_layer, x, *_, grad_z = run_both(make_layer, shape, grad_layout=grad_layout)
    ordinary, expected = reference_grads(plain, x, grad_z, 0.1)
    # The reference's own unfolding is checked against autograd, so a wrong reference cannot pass silently.
    torch.testing.assert_close(plain.weight.grad, ordinary, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tract_layer.weight.grad, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_forward_input_grad_and_bias_grad_are_the_plain_layers(case, grad_layout):
    make_layer, shape = CASES[case]
    plain, tract_layer, _, x1, x2, z1, z2, grad_z = run_both(make_layer, shape, grad_layout=grad_layout)
    assert grad_layout == "contiguous_grad" or grad_z.dim() == 2 or not grad_z.is_contiguous()
    assert torch.equal(z1, z2)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=1e-12)
    if plain.bias is not None:
        torch.testing.assert_close(tract_layer.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)


def test_linear_non_contiguous_input():
    plain, tract_layer, x, x1, x2, z1, z2, grad_z = run_both(lambda: nn.Linear(6, 4), (3, 5, 6),
                                                              transpose_input=True)
    assert not x.is_contiguous()
    assert torch.equal(z1, z2)
    _, expected = reference_grads(plain, x, grad_z, 0.1)
    torch.testing.assert_close(tract_layer.weight.grad, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("case", ["conv2d_3x3_cifar_stem", "conv2d_patch_embed", "woodbury_conv_b_lt_n",
                                  "conv2d_groups", "linear_3d_input", "conv2d_symmetric_gram"])
def test_float32_weight_grad_close_to_float64_closed_form(case, grad_layout):
    make_layer, shape = CASES[case]
    plain, tract_layer, x, *_, grad_z = run_both(make_layer, shape, dtype=torch.float32,
                                                 grad_layout=grad_layout)
    _, expected = reference_grads(plain, x, grad_z, 0.1)
    assert tract_layer.weight.grad.dtype == torch.float32
    assert_rel_close(tract_layer.weight.grad, expected, 1e-5)


def test_lambda_enters_the_gradient_and_can_be_changed():
    make_layer, shape = CASES["conv2d_3x3_cifar_stem"]
    plain, tract_layer, x, *_, grad_z = run_both(make_layer, shape, lam=0.05)
    _, expected = reference_grads(plain, x, grad_z, 0.05)
    torch.testing.assert_close(tract_layer.weight.grad, expected, rtol=1e-9, atol=1e-10)
    tract_layer.lam = 1.6
    tract_layer.weight.grad = None
    tract_layer(x).backward(grad_z)
    _, expected = reference_grads(plain, x, grad_z, 1.6)
    torch.testing.assert_close(tract_layer.weight.grad, expected, rtol=1e-9, atol=1e-10)


def test_second_formulation_of_the_paper_gives_the_same_weight_grad():
    """z = embed(x @ inv(x^T x / b + lam I)); z.data = embed(x)  (paper, section 3.1), for a patch embedding."""
    torch.manual_seed(1)
    lam, p = 0.1, 4
    embed = nn.Conv2d(3, 6, p, stride=p).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grad_z = torch.randn(2, 6, 2, 2, dtype=torch.float64)

    # Patches of a kernel == stride conv: (B, C, H/p, p, W/p, p) -> rows (b, C*p*p); transform, fold back.
    patches = x.reshape(2, 3, 2, p, 2, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3 * p * p)
    b, n = patches.shape
    transformed = patches @ torch.linalg.inv(patches.T @ patches / b + lam * torch.eye(n, dtype=torch.float64))
    x_t = transformed.reshape(2, 2, 2, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 8, 8)
    z = embed(x_t)
    z.data = embed(x).data
    z.backward(grad_z)
    second = embed.weight.grad.clone()

    embed.weight.grad = None
    wrapped = TrAct(embed, lam)
    wrapped(x).backward(grad_z)
    torch.testing.assert_close(wrapped.weight.grad, second, rtol=1e-10, atol=1e-12)


def test_lemma2_zero_gradient_iff_zero_tract_update():
    torch.manual_seed(2)
    lam = 0.1
    layer = TrAct(nn.Linear(4, 3, bias=False).double(), lam)
    x = torch.randn(10, 4, dtype=torch.float64)
    # (i) an upstream gradient orthogonal to every input column: the ordinary gradient grad_z^T X is zero ...
    q, _ = torch.linalg.qr(x, mode="complete")
    grad_z = q[:, 4:] @ torch.randn(6, 3, dtype=torch.float64)
    assert (grad_z.T @ x).abs().max() < 1e-12 and grad_z.abs().max() > 0.1
    layer(x).backward(grad_z)
    assert layer.weight.grad.abs().max() < 1e-12  # ... and TrAct makes no update either
    # (ii) a non-zero ordinary gradient gives a non-zero TrAct update: TrAct's update times G is the ordinary grad.
    layer.weight.grad = None
    grad_z = torch.randn(10, 3, dtype=torch.float64)
    layer(x).backward(grad_z)
    gram = x.T @ x / 10 + lam * torch.eye(4, dtype=torch.float64)
    assert layer.weight.grad.abs().max() > 1e-3
    torch.testing.assert_close(layer.weight.grad @ gram, grad_z.T @ x, rtol=1e-10, atol=1e-12)


def test_rank_one_rows_at_scale_1e4_give_the_closed_form_at_the_asked_lambda():
    """Exactly rank-1 integer rows at scale ~1e4 and lam 1e-4: lam vanishes in the float32 Gram (not SPD there)."""
    torch.manual_seed(3)
    lam, b = 1e-4, 64
    layer = TrAct(nn.Linear(8, 2, bias=False), lam)
    direction = torch.tensor([1.0, -2, 3, 1, -1, 2, 1, 3])
    scale = torch.randint(1, 6, (b, 1)).float() * torch.tensor([-10.0, 10.0]).repeat(b // 2)[:, None]
    x = scale * direction  # integers: every float32 product and sum below is exact
    assert torch.linalg.cholesky_ex(x.T @ x / b + lam * torch.eye(8)).info.item() > 0  # the fast path fails
    grad_z = torch.randint(-3, 4, (b, 2)).float()
    layer(x).backward(grad_z)
    # Every row of grad_z^T X is a multiple of the direction, an eigenvector of G with eigenvalue s + lam.
    s = direction.double().square().sum() * scale.double().square().sum() / b
    expected = (grad_z.T.double() @ x.double()) / (s + lam)
    assert torch.isfinite(layer.weight.grad).all()
    assert_rel_close(layer.weight.grad, expected, 1e-6)  # float32 rounding of the result; lam raised: 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Module contract

def test_wrapper_holds_the_same_parameters_and_attributes():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    wrapped = TrAct(conv, 0.2)
    assert isinstance(wrapped, TrAct) and isinstance(wrapped, nn.Conv2d)
    assert wrapped.weight is conv.weight and wrapped.bias is conv.bias
    assert (wrapped.in_channels, wrapped.out_channels, wrapped.kernel_size, wrapped.stride, wrapped.padding) == \
           (3, 8, (3, 3), (2, 2), (1, 1))
    assert wrapped.lam == 0.2 and wrapped.sync_gram is False
    assert TrAct(nn.Linear(4, 2), 0.1, sync_gram=True).sync_gram is True
    assert "lam=0.2" in repr(wrapped)
    linear = TrAct(nn.Linear(4, 2))
    assert linear.in_features == 4 and linear.out_features == 2 and linear.lam == 0.1


def test_state_dict_round_trips_strict_both_ways():
    torch.manual_seed(4)
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))  # noqa: E731
    vanilla, tracted = make(), make()
    apply_tract(tracted, layer="0")
    assert list(tracted.state_dict()) == list(vanilla.state_dict())
    tracted.load_state_dict(vanilla.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(tracted.state_dict().values(), vanilla.state_dict().values()))
    other = make()
    other.load_state_dict(tracted.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), tracted.state_dict().values()))


def test_optimizer_built_before_wrapping_updates_the_wrapped_layer():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model[0].weight.detach().clone()
    apply_tract(model, lam=0.1, layer="0")
    x = torch.randn(5, 3, 6, 6)
    model(x).square().mean().backward()
    expected_step = model[0].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), before - 0.5 * expected_step)
    assert not torch.equal(model[0].weight.detach(), before)


def test_apply_and_remove_restore_the_plain_layer_with_the_same_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    weight = model[0].weight
    assert apply_tract(model, lam=0.1) == "0"
    assert isinstance(model[0], TrAct) and model[0].weight is weight
    assert remove_tract(model) is model
    assert type(model[0]) is nn.Conv2d and model[0].weight is weight
    assert not hasattr(model[0], "lam")
    plain = remove_tract(TrAct(nn.Linear(3, 2)))
    assert type(plain) is nn.Linear


def test_wrapping_twice_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    apply_tract(model)
    with pytest.raises(ValueError, match="remove_tract"):
        apply_tract(model)
    with pytest.raises(ValueError, match="remove_tract"):
        apply_tract(model, layer="0")
    with pytest.raises(ValueError, match="remove_tract"):
        TrAct(model[0])


@pytest.mark.parametrize("lam", [0, -1, float("nan"), float("inf")])
def test_bad_lambda_is_refused_naming_the_value(lam):
    with pytest.raises(ValueError, match=f"got {lam!r}".replace("(", r"\(").replace(")", r"\)")):
        TrAct(nn.Linear(3, 2), lam)
    with pytest.raises(ValueError, match="lam"):
        apply_tract(nn.Sequential(nn.Linear(3, 2)), lam=lam)
    with pytest.raises(ValueError, match="lam"):
        TrAct(nn.Linear(3, 2)).lam = lam


class _StandardisedConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight / self.weight.std(), self.bias, self.stride, self.padding)


@pytest.mark.parametrize("layer", [nn.ConvTranspose2d(3, 2, 3), nn.BatchNorm2d(3), nn.Embedding(4, 3),
                                   _StandardisedConv(3, 2, 3)], ids=["conv_transpose", "batchnorm", "embedding",
                                                                     "subclass_with_own_forward"])
def test_unsupported_layers_are_refused_naming_the_supported_types(layer):
    with pytest.raises(TypeError, match="nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d"):
        TrAct(layer)


def test_subclass_keeping_the_forward_is_supported():
    class MyConv(nn.Conv2d):
        pass

    wrapped = TrAct(MyConv(3, 2, 3))
    assert isinstance(wrapped, MyConv) and type(remove_tract(wrapped)) is MyConv


def test_apply_tract_unknown_layer_name_is_a_clear_error():
    with pytest.raises(ValueError, match="no submodule 'stem.conv'"):
        apply_tract(nn.Sequential(nn.Conv2d(3, 2, 3)), layer="stem.conv")


def test_deepcopy_and_pickle_keep_tract_and_gradients():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    apply_tract(model, lam=0.3)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(clone[0], TrAct) and clone[0].lam == 0.3 and clone[0].weight is not model[0].weight
        x = torch.randn(2, 3, 5, 5)
        clone[0](x).sum().backward()  # grad_z = 1
        _, expected = reference_grads(clone[0], x, torch.ones(2, 4, 5, 5), 0.3)
        torch.testing.assert_close(clone[0].weight.grad.double(), expected, rtol=1e-4, atol=1e-5)


def test_no_grad_forward_is_the_plain_forward():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        out = TrAct(conv)(x)
    assert out.grad_fn is None and torch.equal(out, conv(x).detach())


class _Net(nn.Module):
    """A model whose module order is not its execution order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.stem = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


def test_find_first_layer_without_timm_metadata():
    assert find_first_layer(nn.Sequential(nn.Identity(), nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
                                          nn.Linear(4, 2))) == "1.0"

    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 2)

    assert find_first_layer(OneLayer()) == "proj"
    with pytest.raises(ValueError, match="pass layer='dotted.name'"):
        find_first_layer(_Net())
    assert apply_tract(_Net(), layer="stem") == "stem"


@pytest.mark.parametrize("name,expected", [
    ("vit_tiny_patch16_224", "patch_embed.proj"), ("deit3_small_patch16_224", "patch_embed.proj"),
    ("resnet18", "conv1"), ("convnext_atto", "stem.0"), ("efficientnet_b0", "conv_stem")])
def test_find_first_layer_on_timm_models(name, expected):
    import timm
    kwargs = {"depth": 1} if "patch16" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    assert find_first_layer(model) == expected
    assert apply_tract(model, lam=0.1) == expected
    layer = model.get_submodule(expected)
    assert isinstance(layer, TrAct) and isinstance(layer, nn.Conv2d)
    x = torch.randn(1, 3, 64, 64) if "patch16" not in name else torch.randn(1, 3, 224, 224)
    model(x).sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vit_small_r26_s32_224", "vit_base_r50_s16_224"])
def test_hybrid_vit_first_layer_is_the_backbone_stem_and_its_std_conv_is_refused(name):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=3, depth=1)
    # What runs first, seen from outside: the first Conv2d/Linear a forward pass calls.
    order = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_pre_hook(lambda m, a, n=module_name: order.append(n))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert order[0] == "patch_embed.backbone.stem.conv" and order.index("patch_embed.proj") > 0
    with pytest.raises(ValueError, match=r"'patch_embed\.backbone\.stem\.conv', is StdConv2dSame, which TrAct does "
                                         r"not support"):
        find_first_layer(model)
    with pytest.raises(ValueError, match="StdConv2dSame"):
        apply_tract(model)
    assert not any(isinstance(m, TrAct) for m in model.modules())


def test_hybrid_vit_with_a_plain_conv_stem_gets_tract_on_the_stem():
    import timm

    import tract.models  # noqa: F401  (registers vit_pico_convstem_28: a HybridEmbed over a plain 3-conv stem)

    model = timm.create_model("vit_pico_convstem_28")
    assert find_first_layer(model) == "patch_embed.backbone.0.conv"



def test_import_tract_needs_torch_only():
    code = ("import sys, tract; heavy = [m for m in ('timm', 'accelerate', 'torchvision') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Precision and compile

def unfolded_closed_form(conv: nn.Conv2d, x: torch.Tensor, grad_z: torch.Tensor, lam: float) -> torch.Tensor:
    """grad_W = grad_z^T X (X^T X / b + lam I)^-1 in float64, X from F.unfold (zero padding, groups 1)."""
    rows = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)
    rows = rows.reshape(-1, rows.shape[-1])
    gz = grad_z.double().flatten(2).transpose(1, 2).reshape(-1, grad_z.shape[1])
    gram = rows.T @ rows / rows.shape[0] + lam * torch.eye(rows.shape[1], dtype=torch.float64)
    return (gz.T @ rows @ torch.linalg.inv(gram)).reshape(conv.weight.shape)


class _Tokens(nn.Module):
    """A timm-style patch embedding: the convolution's output flattened and transposed to (B, N, D) tokens."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.proj = conv

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


AMP_FIRST_LAYERS = {  # (convolution, input shape, output as tokens)
    "vit_patch16_embed": (lambda: nn.Conv2d(3, 32, 16, stride=16), (4, 3, 224, 224), True),  # b = 784, n = 768
    "vit_patch4_cifar_embed": (lambda: nn.Conv2d(3, 32, 4, stride=4), (8, 3, 32, 32), True),  # b = 512, n = 48
    "vit_patch16_embed_b_lt_n": (lambda: nn.Conv2d(3, 32, 16, stride=16), (1, 3, 64, 64), True),  # (b, b) form
    "conv_stem_3x3_stride2_pad1": (lambda: nn.Conv2d(3, 16, 3, stride=2, padding=1), (4, 3, 32, 32), False),
    "resnet_stem_7x7_stride2_pad3": (lambda: nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False),
                                     (4, 3, 32, 32), False),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own inductor internals
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", AMP_FIRST_LAYERS, ids=list(AMP_FIRST_LAYERS))
def test_bf16_autocast_weight_grad_is_the_float64_closed_form_of_what_the_layer_saw(case, compiled):
    make_conv, shape, tokens = AMP_FIRST_LAYERS[case]
    torch.manual_seed(7)
    plain = make_conv()
    wrapped = TrAct(copy.deepcopy(plain), 0.1)
    model = _Tokens(wrapped) if tokens else wrapped
    reference_model = _Tokens(plain) if tokens else plain
    if compiled:
        torch._dynamo.reset()
        model = torch.compile(model, fullgraph=True)
    x = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected_out = model(x), reference_model(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected_out)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected_out.backward(grad_out)
    assert wrapped.weight.grad.dtype == torch.float32
    if plain.bias is not None:  # the ordinary one; inductor may keep the float32 sum that eager rounds to bf16
        tolerance = {"rtol": 8e-3, "atol": 1e-5} if compiled else {}
        torch.testing.assert_close(wrapped.bias.grad, plain.bias.grad, **tolerance)
    # What the layer saw: x cast to bf16, and the bf16 gradient of its output (tokens back to the conv's NCHW).
    grad_z = grad_out.transpose(1, 2).reshape(expected_out.shape[0], -1, *[s // plain.stride[0] for s in shape[2:]]) \
        if tokens else grad_out
    expected = unfolded_closed_form(plain, x.bfloat16(), grad_z, 0.1)
    assert_rel_close(wrapped.weight.grad, expected, 2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(dtype):
    torch.manual_seed(8)
    layer = TrAct(nn.Conv2d(3, 4, 3, padding=1).to(dtype), 0.1)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    z = layer(x)
    grad_z = torch.randn_like(z)
    z.backward(grad_z)
    assert layer.weight.grad.dtype == dtype and torch.isfinite(layer.weight.grad).all()
    _, expected = reference_grads(layer, x, grad_z, 0.1)
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=3e-2, atol=3e-2)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own inductor internals
def test_torch_compile_matches_eager():
    def make():
        torch.manual_seed(9)
        net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
        apply_tract(net, lam=0.1)
        return net

    eager, compiled = make(), make()
    x = torch.randn(4, 3, 16, 16)
    out_c = torch.compile(compiled)(x)
    out_e = eager(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    out_c.square().sum().backward()
    out_e.square().sum().backward()
    for pc, pe in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Exact at the asked lambda for every finite input: float64 where float32's rounding of the Gram is not negligible
# next to lambda ([0, 255] inputs, a tiny lambda, nearly constant images), decided at the layer's first backward.

def natural_images(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Raw pixel values (integers in [0, 255]) of images with a natural 1/f amplitude spectrum."""
    g = torch.Generator().manual_seed(seed)
    freq = torch.fft.fftfreq(size)
    radius = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt().clamp(min=1.0 / size)
    spectrum = torch.complex(*torch.randn(2, batch, channels, size, size, generator=g)) / radius ** 2
    image = torch.fft.ifft2(spectrum).real
    low, high = image.amin((1, 2, 3), keepdim=True), image.amax((1, 2, 3), keepdim=True)
    return ((image - low) / (high - low) * 255).round()


def smooth_images(batch: int, size: int = 16) -> torch.Tensor:
    """Images with no high frequencies (2x2 random grids, bilinear upsampled): their patch Gram is nearly singular."""
    torch.manual_seed(12)
    return F.interpolate(torch.randn(batch, 3, 2, 2), size=(size, size), mode="bilinear", align_corners=True)


def constant_images(batch: int, size: int = 16, noise: float = 0.0) -> torch.Tensor:
    """One random colour per image (plus ``noise``): X has rank 3 of n = 48 without noise."""
    torch.manual_seed(13)
    return torch.rand(batch, 3, 1, 1).expand(batch, 3, size, size) + noise * torch.randn(batch, 3, size, size)


def paper_float32_code(layer: nn.Module, x: torch.Tensor, grad_z: torch.Tensor, lam: float) -> torch.Tensor:
    """The paper's Figure 2 in float32: grad_z^T X inverse(X^T X / b + lam I), X from the same unfold."""
    rows = reference_rows(layer, x).float()
    gz = grad_z.float().movedim(1, -1).reshape(-1, grad_z.shape[1])
    return (gz.T @ rows @ torch.linalg.inv(rows.T @ rows / rows.shape[0] + lam * torch.eye(rows.shape[1]))
            ).reshape(layer.weight.shape)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


EXACTNESS_CASES = {  # convolution, images, lambda
    "cifar_4px_patches_0_255_lam0.1": (lambda: nn.Conv2d(3, 16, 4, stride=4), lambda: natural_images(16, 3, 32, 0),
                                       0.1),  # b = 1024, n = 48
    "vit_16px_patches_0_255_lam0.1": (lambda: nn.Conv2d(3, 32, 16, stride=16), lambda: natural_images(4, 3, 224, 1),
                                      0.1),  # b = 784, n = 768
    "vit_16px_patches_0_255_lam0.1_b_lt_n": (lambda: nn.Conv2d(3, 32, 16, stride=16),
                                             lambda: natural_images(1, 3, 64, 2), 0.1),  # the (b, b) form
    "fmnist_7px_patches_0_255_lam0.1": (lambda: nn.Conv2d(1, 16, 7, stride=7), lambda: natural_images(64, 1, 28, 3),
                                        0.1),  # b = 1024, n = 49
    "smooth_images_lam1e-8": (lambda: nn.Conv2d(3, 8, 4, stride=4), lambda: smooth_images(8), 1e-8),
    "near_constant_images_lam1e-8": (lambda: nn.Conv2d(3, 8, 4, stride=4),
                                     lambda: constant_images(8, noise=1e-3), 1e-8),
    "constant_images_lam1e-8": (lambda: nn.Conv2d(3, 8, 4, stride=4), lambda: constant_images(8), 1e-8),
    "constant_images_0_255_lam0.1": (lambda: nn.Conv2d(3, 8, 4, stride=4),
                                     lambda: (constant_images(8) * 255).round(), 0.1),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own inductor internals
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", EXACTNESS_CASES, ids=list(EXACTNESS_CASES))
def test_weight_grad_is_the_closed_form_at_the_asked_lambda_where_float32_cannot_resolve_it(case, compiled):
    make_conv, make_images, lam = EXACTNESS_CASES[case]
    torch.manual_seed(14)
    conv = make_conv()
    layer = TrAct(copy.deepcopy(conv), lam)
    x = make_images().contiguous()
    if compiled:
        torch._dynamo.reset()
    z = (torch.compile(layer, fullgraph=True) if compiled else layer)(x)
    grad_z = torch.randn_like(z) * 1e-3
    z.backward(grad_z)
    _, expected = reference_grads(conv, x, grad_z, lam)
    assert torch.isfinite(layer.weight.grad).all()
    error = relative_error(layer.weight.grad, expected)
    try:
        paper = relative_error(paper_float32_code(conv, x, grad_z, lam), expected)
    except torch.linalg.LinAlgError:  # constant images: the float32 Gram + lam I is singular to working precision
        paper = float("inf")
    assert error < 1e-4 and error <= paper, f"relative error {error:.1e} (the paper's float32 code: {paper:.1e})"


def test_a_resolvable_lambda_is_used_as_it_is():
    conv = nn.Conv2d(3, 8, 4, stride=4)
    x = torch.randn(8, 3, 16, 16)
    layer = TrAct(copy.deepcopy(conv), 0.05)  # standardised inputs, the paper's smallest lambda
    z = layer(x)
    grad_z = torch.randn_like(z)
    z.backward(grad_z)
    _, expected = reference_grads(conv, x, grad_z, 0.05)
    assert_rel_close(layer.weight.grad, expected, 1e-5)
    _, other = reference_grads(conv, x, grad_z, 0.05 * (1 + 1e-3))
    assert (other - expected).norm() / expected.norm() > 1e-5  # the tolerance above would see a changed lambda


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten._local_scalar_dense: every read of a tensor's value on the host (item, bool, int, float) goes
    through it, and on a GPU each is a device->host synchronisation; and the ops that produce float64 tensors. Inside
    TrAct's operator too, whose implementation is run here with this mode still on."""

    def __init__(self):
        super().__init__()
        self.reads = self.float64_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):  # item: inside it
            self.reads += 1
        if func is torch.ops.tract.weight_grad.default:
            with self:
                return tract.method._weight_grad_impl(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in torch.utils._pytree.tree_leaves(out)):
            self.float64_ops += 1
        return out


@pytest.mark.parametrize("lam, images, float64", [(0.1, "standardised", False), (0.1, "pixels", True),
                                                  (1e-8, "constant", True)],
                         ids=["standardised_float32", "pixels_0_255_float64", "constant_lam1e-8_float64"])
@pytest.mark.parametrize("kind", ["gram", "woodbury"])
def test_a_layer_reads_the_host_once_at_its_first_backward_and_uses_float64_only_where_needed(lam, images, float64,
                                                                                              kind):
    torch.manual_seed(0)
    batch = 8 if kind == "gram" else 1  # one 16-px image: b = 16 patches < n = 48, the (b, b) form
    x = {"standardised": lambda: torch.randn(batch, 3, 16, 16),
         "pixels": lambda: natural_images(batch, 3, 16, 4),
         "constant": lambda: constant_images(batch).contiguous()}[images]()
    layer = TrAct(nn.Conv2d(3, 8, 4, stride=4), lam)
    counts = []
    for _ in range(3):
        z = layer(x)
        grad_z = torch.randn_like(z)
        with _HostReads() as mode:
            z.backward(grad_z)
        counts.append((mode.reads, mode.float64_ops > 0))
        assert torch.isfinite(layer.weight.grad).all()
    assert counts == [(1, float64), (0, float64), (0, float64)]


def test_a_changed_lambda_changes_the_dtype_without_a_host_read():
    conv = nn.Conv2d(3, 8, 4, stride=4)
    layer = TrAct(copy.deepcopy(conv), 0.1)
    x = smooth_images(8)
    layer(x).sum().backward()  # decides from this Gram: float32 resolves lambda 0.1
    layer.lam, layer.weight.grad = 1e-8, None
    z = layer(x)
    grad_z = torch.randn_like(z)
    with _HostReads() as mode:
        z.backward(grad_z)
    assert mode.reads == 0 and mode.float64_ops > 0
    _, expected = reference_grads(conv, x, grad_z, 1e-8)
    assert_rel_close(layer.weight.grad, expected, 1e-4)


def test_the_gram_is_built_in_full_float32_whatever_the_matmul_precision(monkeypatch):
    import tract.method as method

    seen = []
    add_gram = method._add_gram

    def recording(gram, rows):
        seen.append(torch.get_float32_matmul_precision())
        return add_gram(gram, rows)

    monkeypatch.setattr(method, "_add_gram", recording)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed, as train.py sets it on CUDA
    try:
        layer = TrAct(nn.Conv2d(3, 8, 4, stride=4), 0.1)
        layer(torch.rand(4, 3, 16, 16)).sum().backward()
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.set_float32_matmul_precision(previous)
