"""Write scikit-learn's digits as an image folder a user could have: 32x32 RGB PNG files in one folder per
class (data/digits-rgb/<digit>/<n>.png). Each digit is drawn in a random colour on a random background colour
and at a random position, so that all three channels and the whole frame matter; and two PNGs to predict.

    python make_data.py            # writes data/digits-rgb/ and samples/
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def render(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An 8x8 digit (0..16) scaled to 16x16, drawn in one colour on another, somewhere in a 32x32 frame."""
    ink = np.kron(pixels / 16.0, np.ones((2, 2)))[..., None]  # (16, 16, 1) in [0, 1]
    foreground, background = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.4, 3)
    if rng.random() < 0.5:  # light digits on dark, and dark on light
        foreground, background = background, foreground
    frame = np.tile(background, (32, 32, 1))
    top, left = rng.integers(0, 17, size=2)
    frame[top:top + 16, left:left + 16] = ink * foreground + (1 - ink) * background
    return Image.fromarray(np.round(frame * 255).astype(np.uint8), "RGB")


def main() -> None:
    digits, rng = load_digits(), np.random.default_rng(0)
    root = HERE / "data" / "digits-rgb"
    for name in NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        render(pixels, rng).save(root / NAMES[target] / f"{i:04d}.png")
    (HERE / "samples").mkdir(exist_ok=True)
    for i in (0, 7):
        render(digits.images[i], rng).save(HERE / "samples" / f"{NAMES[digits.target[i]]}.png")
    print(f"wrote {len(digits.images)} images to {root} and two samples to {HERE / 'samples'}")


if __name__ == "__main__":
    main()
