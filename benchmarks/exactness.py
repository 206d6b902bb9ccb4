"""TrAct's weight gradient against the float64 closed form: relative errors (Frobenius) on the cases of
tests/test_method.py (raw [0, 255] images, tiny lambdas, constant images, bf16 autocast) and on standardised inputs,
next to the paper's Figure 2 run in float32 (float32 Gram + torch.linalg.inv) and eps * trace(G) / lam, float32's
rounding of the Gram relative to lambda (eps = 2^-23, G = X^T X / b), which decides TrAct's dtype (float64 above 1e-2).

Run from the repository root:
  .venv/bin/python benchmarks/exactness.py                        # this checkout's tract
  .venv/bin/python benchmarks/exactness.py --tract-root /tmp/old   # another checkout's tract (e.g. a git archive
                                                                   # of an older commit), same cases and references
Prints a Markdown table; eager and compiled (torch.compile, inductor) for each case. CPU, a few minutes.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _case_rows(tm, nn):
    """(name, make_conv, make_images, lam) for every case: the tests' exactness cases, then standardised ones."""
    standardised = lambda images: lambda: (images() / 255 - 0.45) / 0.225  # noqa: E731
    extra = {
        "standardised 1/f images, CIFAR 4-px patches, lam 0.1": (
            lambda: nn.Conv2d(3, 16, 4, stride=4), standardised(lambda: tm.natural_images(16, 3, 32, 0)), 0.1),
        "standardised, ViT 16-px patches, lam 0.1": (
            lambda: nn.Conv2d(3, 32, 16, stride=16), standardised(lambda: tm.natural_images(4, 3, 224, 1)), 0.1),
        "standardised, ViT 16-px patches, lam 0.05": (
            lambda: nn.Conv2d(3, 32, 16, stride=16), standardised(lambda: tm.natural_images(4, 3, 224, 1)), 0.05),
        "[0, 1], ViT 16-px patches, lam 0.1": (
            lambda: nn.Conv2d(3, 32, 16, stride=16), lambda: tm.natural_images(4, 3, 224, 1) / 255, 0.1),
    }
    return [(name, *case) for name, case in {**tm.EXACTNESS_CASES, **extra}.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tract-root", type=Path, default=ROOT, help="checkout whose tract/ is measured (this one)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    args = parser.parse_args(argv)
    if not (args.tract_root / "tract" / "method.py").is_file():
        parser.error(f"--tract-root {args.tract_root} has no tract/method.py: pass a checkout of this repository")
    sys.path[:0] = [str(args.tract_root.resolve()), str(ROOT / "tests")]
    import torch
    import test_method as tm  # the cases and the float64 references of the tests, imported, not copied
    import tract.method
    from torch import nn

    torch.set_num_threads(args.threads)
    print(f"tract from {Path(tract.method.__file__).parent}, torch {torch.__version__}, CPU\n")
    print("| case | eager | compiled | paper's float32 code | eps trace(G) / lam |")
    print("|---|---|---|---|---|")
    for name, make_conv, make_images, lam in _case_rows(tm, nn):
        errors = []
        for compiled in (False, True):
            torch.manual_seed(14)
            conv = make_conv()
            layer = tm.TrAct(copy.deepcopy(conv), lam)
            x = make_images().contiguous()
            torch._dynamo.reset()
            z = (torch.compile(layer, fullgraph=True) if compiled else layer)(x)
            grad_z = torch.randn_like(z) * 1e-3
            z.backward(grad_z)
            _, expected = tm.reference_grads(conv, x, grad_z, lam)
            errors.append(tm.relative_error(layer.weight.grad, expected))
        try:
            paper = f"{tm.relative_error(tm.paper_float32_code(conv, x, grad_z, lam), expected):.1e}"
        except torch.linalg.LinAlgError:
            paper = "singular"
        rows = tm.reference_rows(conv, x)
        rounding = torch.finfo(torch.float32).eps * (rows.square().sum() / rows.shape[0]).item() / lam
        print(f"| {name} | {errors[0]:.1e} | {errors[1]:.1e} | {paper} | {rounding:.1e} |", flush=True)
    for name, (make_conv, shape, tokens) in tm.AMP_FIRST_LAYERS.items():
        errors = []
        for compiled in (False, True):
            torch.manual_seed(7)
            plain = make_conv()
            wrapped = tm.TrAct(copy.deepcopy(plain), 0.1)
            model = tm._Tokens(wrapped) if tokens else wrapped
            torch._dynamo.reset()
            if compiled:
                model = torch.compile(model, fullgraph=True)
            x = torch.randn(shape)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            grad_out = torch.randn_like(out)
            out.backward(grad_out)
            grad_z = grad_out.transpose(1, 2).reshape(out.shape[0], -1, *[s // plain.stride[0] for s in shape[2:]]) \
                if tokens else grad_out
            errors.append(tm.relative_error(wrapped.weight.grad, tm.unfolded_closed_form(plain, x.bfloat16(), grad_z,
                                                                                          0.1)))
        print(f"| bf16 autocast, {name}, lam 0.1 | {errors[0]:.1e} | {errors[1]:.1e} | | |", flush=True)


if __name__ == "__main__":
    main()
