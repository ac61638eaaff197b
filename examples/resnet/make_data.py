"""Write scikit-learn's digits as an image folder of 64x64 RGB PNG files, one folder per class
(data/digits-64/<digit>/<n>.png): each digit upscaled to a random size (28 to 44 pixels), drawn in a random
colour on a random background colour at a random position, with a little noise, so that all three channels and
the whole frame matter; and two PNGs to predict.

    python make_data.py            # writes data/digits-64/ and samples/
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FRAME = 64


def render(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An 8x8 digit (0..16) upscaled to 28..44 pixels, one colour on another, somewhere in a 64x64 frame."""
    size = int(rng.integers(28, 45))
    digit = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), "L").resize((size, size),
                                                                                        Image.Resampling.BILINEAR)
    ink = (np.asarray(digit, dtype=np.float64) / 255.0)[..., None]  # (size, size, 1) in [0, 1]
    foreground, background = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.4, 3)
    if rng.random() < 0.5:  # light digits on dark, and dark on light
        foreground, background = background, foreground
    frame = np.tile(background, (FRAME, FRAME, 1))
    top, left = rng.integers(0, FRAME - size + 1, size=2)
    frame[top:top + size, left:left + size] = ink * foreground + (1 - ink) * background
    frame = np.clip(frame + rng.normal(0.0, 0.02, frame.shape), 0.0, 1.0)
    return Image.fromarray(np.round(frame * 255).astype(np.uint8), "RGB")


def main() -> None:
    digits, rng = load_digits(), np.random.default_rng(0)
    root = HERE / "data" / "digits-64"
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
