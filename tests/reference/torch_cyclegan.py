"""The reference CycleGAN recipe in PyTorch eager, trained on dumped batches: run by hand.

Not part of the project or its tests: a throwaway reference for the learning
comparison, run in a separate Python 3.11 venv with the CPU torch wheel:

    python3.11 -m venv /work/torchref && /work/torchref/bin/pip install torch==2.13.0 numpy
    /work/torchref/bin/python tests/reference/torch_cyclegan.py \
        --batches /tmp/learning/batches_0.npz --seed 0 --out /tmp/learning/torch_0.npz \
        --ngf 32 --ndf 32 --blocks 6
    # Step speed on random batches, the figure `python -m faceage_jax.bench step` prints
    # (--dtype bfloat16 runs the forward passes under torch.autocast('cpu', torch.bfloat16)):
    /work/torchref/bin/python tests/reference/torch_cyclegan.py --bench 10 \
        --image_size 128 --ngf 64 --ndf 64 --blocks 9 --batch_size 1 [--dtype bfloat16]

The recipe of Zhu et al. 2017 as the reference implementation runs it: ResNet
generator (reflection padding, instance norm without affine parameters, conv
biases, transposed convolutions), 70x70 PatchGAN (3 layers), N(0, 0.02)
weights and zero biases, least-squares GAN, cycle lambda 10, identity 0.5 x 10,
a 50-image pool per domain (a stored image returned with probability 0.5 once
full), Adam 2e-4 (0.5, 0.999) for the generators and for the discriminators,
generators updated first, discriminators on the pooled fakes with loss
0.5 (real + fake). The learning rate is constant for `constant_steps` and then
linear to 0, per step, as faceage_jax's schedule (the reference counts epochs).

Writes every step's loss terms (named as faceage_jax logs them) and the
generators' outputs on the held-out faces: translations and cycles.
"""

import argparse
import contextlib
import time

import numpy as np
import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x):
        return x + self.body(x)


def generator(ngf, blocks):
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
    for i in range(2):
        channels = ngf * 2**i
        layers += [
            nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1),
            nn.InstanceNorm2d(channels * 2),
            nn.ReLU(True),
        ]
    layers += [ResidualBlock(ngf * 4) for _ in range(blocks)]
    for i in range(2):
        channels = ngf * 2 ** (2 - i)
        layers += [
            nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(channels // 2),
            nn.ReLU(True),
        ]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
    return nn.Sequential(*layers)


def discriminator(ndf, n_layers=3):
    layers = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    channels = ndf
    for n in range(1, n_layers + 1):
        out = ndf * min(2**n, 8)
        stride = 2 if n < n_layers else 1
        layers += [
            nn.Conv2d(channels, out, 4, stride=stride, padding=1),
            nn.InstanceNorm2d(out),
            nn.LeakyReLU(0.2, True),
        ]
        channels = out
    layers += [nn.Conv2d(channels, 1, 4, stride=1, padding=1)]
    return nn.Sequential(*layers)


def init_weights(module):
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)


class ImagePool:
    def __init__(self, size, generator):
        self.size, self.images, self.generator = size, [], generator

    def query(self, images):
        if self.size == 0:
            return images
        returned = []
        for image in images.detach():
            image = image[None]
            if len(self.images) < self.size:
                self.images.append(image)
                returned.append(image)
            elif torch.rand((), generator=self.generator) < 0.5:
                slot = int(torch.randint(0, self.size, (), generator=self.generator))
                returned.append(self.images[slot].clone())
                self.images[slot] = image
            else:
                returned.append(image)
        return torch.cat(returned)


def nchw(array):
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


class Recipe:
    """Both generators and discriminators, their optimizers and pools: one training step."""

    def __init__(self, ngf, ndf, blocks, lr, pool, seed, autocast=None):
        torch.manual_seed(seed)
        self.to_old, self.to_young = generator(ngf, blocks), generator(ngf, blocks)
        self.d_young, self.d_old = discriminator(ndf), discriminator(ndf)
        for network in (self.to_old, self.to_young, self.d_young, self.d_old):
            network.apply(init_weights)
        betas = (0.5, 0.999)
        self.g_opt = torch.optim.Adam(
            [*self.to_old.parameters(), *self.to_young.parameters()], lr=lr, betas=betas
        )
        self.d_opt = torch.optim.Adam(
            [*self.d_young.parameters(), *self.d_old.parameters()], lr=lr, betas=betas
        )
        pool_rng = torch.Generator().manual_seed(seed + 1000)
        self.pools = {"young": ImagePool(pool, pool_rng), "old": ImagePool(pool, pool_rng)}
        # torch.autocast('cpu', dtype=torch.bfloat16) around the forward passes, as
        # PyTorch's mixed-precision recipe runs it; the weights and Adam stay float32.
        self.autocast = autocast

    def _forward(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast)

    def step(self, young, old, rate):
        """One step at learning rate `rate`: the generators, then the discriminators."""
        mse, l1 = nn.MSELoss(), nn.L1Loss()
        for opt in (self.g_opt, self.d_opt):
            for group in opt.param_groups:
                group["lr"] = rate
        for network in (self.d_young, self.d_old):
            network.requires_grad_(False)
        with self._forward():
            fake_old, fake_young = self.to_old(young), self.to_young(old)
            scores_old, scores_young = self.d_old(fake_old), self.d_young(fake_young)
            terms = {
                "generator/adversarial_young_to_old": mse(scores_old, torch.ones_like(scores_old)),
                "generator/adversarial_old_to_young": mse(
                    scores_young, torch.ones_like(scores_young)
                ),
                "generator/cycle_young": 10.0 * l1(self.to_young(fake_old), young),
                "generator/cycle_old": 10.0 * l1(self.to_old(fake_young), old),
                "generator/identity_old": 5.0 * l1(self.to_old(old), old),
                "generator/identity_young": 5.0 * l1(self.to_young(young), young),
            }
            g_total = sum(terms.values())
        self.g_opt.zero_grad()
        g_total.backward()
        self.g_opt.step()

        for network in (self.d_young, self.d_old):
            network.requires_grad_(True)
        d_terms = {}
        with self._forward():
            for domain, network, real, fake in (
                ("young", self.d_young, young, fake_young),
                ("old", self.d_old, old, fake_old),
            ):
                pooled = self.pools[domain].query(fake.float())
                real_scores, fake_scores = network(real), network(pooled.detach())
                d_terms[f"discriminator/{domain}"] = 0.5 * (
                    mse(real_scores, torch.ones_like(real_scores))
                    + mse(fake_scores, torch.zeros_like(fake_scores))
                )
            d_total = sum(d_terms.values())
        self.d_opt.zero_grad()
        d_total.backward()
        self.d_opt.step()
        return {**terms, "generator/total": g_total, **d_terms, "discriminator/total": d_total}


def bench(args):
    """Step speed on random batches, as `python -m faceage_jax.bench step` times its own."""
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[args.dtype]
    recipe = Recipe(args.ngf, args.ndf, args.blocks, args.lr, args.pool, args.seed, dtype)
    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    young, old = (nchw(rng.uniform(-1, 1, shape).astype(np.float32)) for _ in range(2))
    times = []
    for i in range(args.warmup + args.bench):
        start = time.perf_counter()
        recipe.step(young, old, args.lr)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    print(
        f"torch {torch.__version__} {args.dtype}, {torch.get_num_threads()} threads, "
        f"{args.image_size}px, ngf {args.ngf}, ndf {args.ndf}, {args.blocks} blocks, "
        f"batch {args.batch_size}"
    )
    print(f"seconds/step: {seconds:.4f} (median of {len(times)})")
    print(f"images/s: {args.batch_size / seconds:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", help="the dumped batches to train on (learning_batches.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    parser.add_argument("--ngf", type=int, default=32)
    parser.add_argument("--ndf", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--pool", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bench", type=int, default=0, help="time this many steps instead")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.bench:
        return bench(args)
    if not (args.batches and args.out):
        parser.error("training needs --batches and --out (or give --bench STEPS)")
    data = np.load(args.batches)
    young_batches, old_batches = data["young"], data["old"]
    steps = len(young_batches)
    constant_steps = steps // 2  # The demo's 1 + 1 epochs.
    recipe = Recipe(args.ngf, args.ndf, args.blocks, args.lr, args.pool, args.seed)
    log = {}
    start = time.perf_counter()
    for step in range(steps):
        rate = args.lr
        if step >= constant_steps:
            rate = args.lr * (1 - (step - constant_steps) / max(steps - constant_steps, 1))
        young, old = nchw(young_batches[step]), nchw(old_batches[step])
        values = recipe.step(young, old, rate)
        for name, value in values.items():
            log.setdefault(name, []).append(float(value))
        if (step + 1) % 20 == 0:
            print(f"step {step + 1}: {time.perf_counter() - start:.0f} s", flush=True)

    to_old, to_young = recipe.to_old, recipe.to_young
    with torch.no_grad():
        outputs = {}
        for name, forward, backward, images in (
            ("young_to_old", to_old, to_young, data["test_young"]),
            ("old_to_young", to_young, to_old, data["test_old"]),
        ):
            inputs = nchw(images.astype(np.float32) / 127.5 - 1)
            translated = forward(inputs)
            outputs[f"{name}/generated"] = translated.permute(0, 2, 3, 1).numpy()
            outputs[f"{name}/cycle"] = backward(translated).permute(0, 2, 3, 1).numpy()
    np.savez(
        args.out,
        **{f"loss/{k}": np.array(v) for k, v in log.items()},
        **outputs,
        seconds=time.perf_counter() - start,
    )
    print(f"{steps} steps in {time.perf_counter() - start:.0f} s: {args.out}")


if __name__ == "__main__":
    main()
