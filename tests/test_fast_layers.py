"""model.py's rewritten layers against torch's own nn.Conv2d / nn.ConvTranspose2d (the oracle):
outputs and gradients (input, weight, bias) to float tolerance, and whole networks against a
plain nn.Sequential built from the same weights."""
import pytest
import torch
import torch.nn as nn

import model

# (rewritten class, oracle class, constructor arguments, input shape without the batch)
LAYERS = [
    (model.PatchConv2d, nn.Conv2d, dict(in_channels=1, out_channels=32, kernel_size=3, stride=2,
                                        padding=1), (1, 28, 28)),          # the encoder's first
    (model.PatchConv2d, nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=(3, 2),
                                        stride=(1, 2), padding=(1, 0), bias=False), (3, 9, 8)),
    (model.MatmulConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=128, out_channels=128, kernel_size=2), (128, 1, 1)),  # the decoder's first
    (model.MatmulConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=32, out_channels=1, kernel_size=3, stride=2, padding=1, output_padding=1),
     (32, 14, 14)),                                                         # the decoder's last
    (model.MatmulConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1), (6, 4, 4)),
    (model.MatmulConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=5, out_channels=3, kernel_size=2, bias=False), (5, 1, 1)),
]


def outputs_and_grads(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("fast_cls,ref_cls,kwargs,shape", LAYERS)
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_matches_torch(fast_cls, ref_cls, kwargs, shape, batch, channels_last):
    gen = torch.Generator().manual_seed(batch)
    torch.manual_seed(batch)
    fast = fast_cls(**kwargs)
    ref = ref_cls(**kwargs)
    ref.load_state_dict(fast.state_dict())
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(batch, *shape, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fast, ref = (m.to(memory_format=torch.channels_last) for m in (fast, ref))
    out_ref = ref(x)
    grad_out = torch.randn(out_ref.shape, generator=gen)
    out_ref, grads_ref = outputs_and_grads(ref, x, grad_out)
    out_fast, grads_fast = outputs_and_grads(fast, x, grad_out)
    assert out_fast.shape == out_ref.shape
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    assert len(grads_fast) == len(grads_ref)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-4)


def plain_copy(net: nn.Module) -> nn.Module:
    """The same network with every rewritten layer replaced by the torch layer it rewrites,
    loaded with the same weights."""
    if isinstance(net, (model.PatchConv2d, model.MatmulConvTranspose2d)):
        base = nn.Conv2d if isinstance(net, nn.Conv2d) else nn.ConvTranspose2d
        ref = base(net.in_channels, net.out_channels, net.kernel_size, net.stride, net.padding,
                   **({"output_padding": net.output_padding} if base is nn.ConvTranspose2d else {}),
                   bias=net.bias is not None)
        ref.load_state_dict(net.state_dict())
        return ref
    if isinstance(net, nn.Sequential):
        return nn.Sequential(*[plain_copy(m) for m in net])
    return net


def test_the_networks_use_the_rewritten_layers_and_keep_their_state_dict_keys():
    vae = model.VAE(200)
    assert isinstance(vae.encoder.conv[0], model.PatchConv2d)
    assert isinstance(vae.decoder.deconv[0], model.MatmulConvTranspose2d)
    assert isinstance(vae.decoder.deconv[-1], model.MatmulConvTranspose2d)
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes["encoder.conv.0.weight"] == (32, 1, 3, 3)
    assert shapes["decoder.deconv.0.weight"] == (128, 128, 2, 2)
    assert shapes["decoder.deconv.8.weight"] == (32, 1, 3, 3)
    assert len(shapes) == 24


@pytest.mark.parametrize("latent_dim", [200, 2])
@pytest.mark.parametrize("batch", [1, 5])
def test_encoder_and_decoder_match_a_plain_sequential_reference(latent_dim, batch):
    torch.manual_seed(latent_dim + batch)
    enc, dec = model.Encoder(latent_dim), model.Decoder(latent_dim)
    # The reference: plain nn layers in one nn.Sequential each, from the same weights.
    enc_conv, dec_deconv = plain_copy(enc.conv), plain_copy(dec.deconv)
    ref_encoder = nn.Sequential(enc_conv)
    ref_decoder = nn.Sequential(dec.fc, nn.Unflatten(1, (128, 1, 1)), dec_deconv)
    assert not any(isinstance(m, (model.PatchConv2d, model.MatmulConvTranspose2d))
                   for m in list(ref_encoder.modules()) + list(ref_decoder.modules()))
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, 28, 28, generator=gen).requires_grad_(True)
    z = torch.randn(batch, latent_dim, generator=gen).requires_grad_(True)

    def run(encode, decode, params):
        mu, logvar = encode(x)
        image = decode(z)
        loss = (mu.pow(2).sum() + logvar.sin().sum() + image.pow(2).sum())
        grads = torch.autograd.grad(loss, [x, z, *params])
        return [mu, logvar, image, *grads]

    fast_params = list(enc.parameters()) + list(dec.parameters())
    ref_params = (list(enc_conv.parameters()) + list(enc.mu.parameters())
                  + list(enc.logvar.parameters()) + list(dec.fc.parameters())
                  + list(dec_deconv.parameters()))
    h = lambda t: ref_encoder(t).flatten(1)                              # noqa: E731
    ours = run(enc, dec, fast_params)
    theirs = run(lambda t: (enc.mu(h(t)), enc.logvar(h(t))), ref_decoder, ref_params)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_decoder_jacobian_matches_the_plain_decoder():
    """Q4's forward-mode Jacobian goes through the rewritten layers (vmap + jacfwd)."""
    torch.manual_seed(0)
    dec = model.Decoder(8)
    ref = nn.Sequential(dec.fc, nn.Unflatten(1, (128, 1, 1)), plain_copy(dec.deconv))
    z = torch.randn(3, 8)
    torch.testing.assert_close(model.decoder_jacobian(dec, z), model.decoder_jacobian(ref, z),
                               rtol=1e-4, atol=1e-5)
