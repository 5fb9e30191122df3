"""φ's hand-written backward (eager) and fused kernels (CPU, Triton) against autograd through the same math written
plainly (float64)."""

import pytest
import torch
import torch.nn.functional as F

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
from metaperturb_hf.modeling_metaperturb import _gauss_hermite_standard_normal


def plain_phi(phi, h, mean, var, channel_norm, spatial_norm, kappa, eps, clip, expected_noise):
    """docs/method.md line by line, differentiated by autograd: the oracle."""
    batch, channels, height, width = h.shape

    def per_channel(x, k):
        return F.conv2d(x.reshape(-1, 1, height, width), k.view(1, 1, 3, 3), padding=1).view(x.shape)

    def mean_conv(x, k):
        return F.conv2d(x.mean(1, keepdim=True), k.view(1, 1, 3, 3), padding=1)

    lam, gam = phi.identity_kernels, phi.mean_kernels
    hidden = F.relu(per_channel(h, lam[0]) + mean_conv(h, gam[0]))
    mu = per_channel(hidden, lam[1]) + mean_conv(hidden, gam[1])
    if expected_noise:
        nodes, weights = _gauss_hermite_standard_normal(MetaPerturbModel.expected_noise_nodes)
        z = sum(w * F.softplus(mu + x) for x, w in zip(nodes.tolist(), weights.tolist()))
    else:
        z = F.softplus(mu + eps)
    pooled = torch.stack([F.relu(per_channel(h, k)).mean((2, 3)) for k in phi.stat_kernels], -1)
    if phi.training:
        m, v = pooled.mean(0), pooled.var(0)
    else:
        m, v = mean, var
    descriptors = h.new_tensor([channels / channel_norm, height / spatial_norm]).expand(channels, 2)
    s = torch.sigmoid(torch.cat([m, v, descriptors], 1) @ phi.scale_weight)
    out = h * ((s[None, :, None, None] * z - 1) * kappa + 1)
    return out if clip is None else out.clamp(max=clip)


def enable_activation_checkpointing(phi):
    """transformers' switch: `activation_checkpointing_enable`, called `gradient_checkpointing_enable` before."""
    enable = getattr(phi, "activation_checkpointing_enable", None) or phi.gradient_checkpointing_enable
    enable()
    assert phi.gradient_checkpointing


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(
    "training, kappa, clip, expected_noise, channels_last",
    [
        (True, 1.0, None, False, False),
        (True, 0.6, 1.5, False, False),
        (True, 1.0, None, False, True),
        (False, 1.0, None, False, False),
        (False, 0.8, None, True, False),
    ],
)
def test_hand_written_backward_matches_autograd(training, kappa, clip, expected_noise, channels_last, checkpointing,
                                               kernel):
    torch.manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.5)).double().train(training)
    phi.kernel = kernel
    if checkpointing:
        enable_activation_checkpointing(phi)
    h = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    eps = torch.randn_like(h)
    stats = torch.rand(5, 4, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64)
    upstream = torch.randn_like(h)

    def gradients(function):
        phi.zero_grad()
        x = h.clone().requires_grad_()
        out = function(x)
        (out * upstream).sum().backward()
        return out.detach(), [x.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                         for p in phi.parameters()]

    ours, our_grads = gradients(lambda x: phi(x, *(s.clone() for s in stats), 16, 8, noise_coeff=kappa,
                                              noise=None if expected_noise else eps, clip_value=clip,
                                              expected_noise=expected_noise))
    if clip is not None:
        assert (ours == clip).any(), "the clamp must be active somewhere for this case to test it"
    theirs, their_grads = gradients(lambda x: plain_phi(phi, x, *stats, 16, 8, kappa, eps, clip, expected_noise))
    torch.testing.assert_close(ours, theirs)
    names = ["input"] + [name for name, _ in phi.named_parameters()]
    for name, mine, reference in zip(names, our_grads, their_grads):
        torch.testing.assert_close(mine, reference, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_frozen_phi_gets_no_gradients_and_input_gradients_keep_their_layout():
    phi = MetaPerturbModel(MetaPerturbConfig()).requires_grad_(False)
    x = torch.randn(4, 6, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    phi(x, torch.zeros(6, 4), torch.ones(6, 4), 6, 8).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert all(p.grad is None for p in phi.parameters())


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd keeps for backward during `step`."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = step()
    return sum(storages.values()), result


def test_checkpointing_redraws_the_same_noise_and_saves_only_the_input(kernel):
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.5)).train()
    phi.kernel = kernel
    h = torch.randn(8, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn_like(h)

    def step():
        phi.zero_grad()
        x = h.clone().requires_grad_()
        torch.manual_seed(7)
        out = phi(x, torch.zeros(16, 4), torch.ones(16, 4), 16, 8)
        out.backward(upstream)
        return out.detach(), [x.grad] + [p.grad.clone() for p in phi.parameters()]

    stored, (out, grads) = saved_bytes(step)
    enable_activation_checkpointing(phi)
    checkpointed_stored, (checkpointed_out, checkpointed_grads) = saved_bytes(step)
    torch.testing.assert_close(checkpointed_out, out, atol=0, rtol=0)
    for checkpointed, reference in zip(checkpointed_grads, grads):
        torch.testing.assert_close(checkpointed, reference)
    # Without checkpointing eager φ keeps the input, the noise (a float each) and the hidden layer's mask (a byte
    # each); the fused kernel always keeps only the input and recomputes the rest.
    if kernel == "eager":
        assert stored - checkpointed_stored >= h.numel() * 5
    else:
        assert stored == checkpointed_stored
    assert checkpointed_stored < h.numel() * 5  # the input, and per-channel statistics far smaller than a byte each


@pytest.mark.parametrize(
    "training, kappa, clip, expected_noise",
    [(True, 1.0, None, False), (True, 0.6, 1.5, False), (False, 0.8, None, True)],
)
def test_a_differentiated_backward_matches_autograd(training, kappa, clip, expected_noise, kernel):
    """Lookahead meta-training differentiates the θ-gradient again, in φ and in the input."""
    torch.manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.5)).double().train(training)
    phi.kernel = kernel
    h = torch.randn(3, 5, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    eps, upstream, direction = torch.randn_like(h), torch.randn_like(h), torch.randn_like(h)
    stats = torch.rand(5, 4, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64)

    def second_order(function):
        x = h.clone().requires_grad_()
        (input_grad,) = torch.autograd.grad((function(x) * upstream).sum(), x, create_graph=True)
        inputs = [x, *phi.parameters()]
        grads = torch.autograd.grad((input_grad * direction).sum(), inputs, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]

    ours = second_order(lambda x: phi(x, *(s.clone() for s in stats), 16, 8, noise_coeff=kappa,
                                      noise=None if expected_noise else eps, clip_value=clip,
                                      expected_noise=expected_noise))
    theirs = second_order(lambda x: plain_phi(phi, x, *stats, 16, 8, kappa, eps, clip, expected_noise))
    for name, mine, reference in zip(["input"] + [n for n, _ in phi.named_parameters()], ours, theirs):
        torch.testing.assert_close(mine, reference, msg=lambda m, name=name: f"second-order gradient of {name}: {m}")
