"""Would one vision-tower forward for the images of several requests beat one forward each?
nano's Pixtral-style tower on this CPU, side by side in one run (issue 22, item 3).

- **singles**: what the hf engine does today, one ``get_image_features`` call per image;
- **packed**: transformers' own batched call, the images of different sizes packed into one
  sequence with a block-diagonal attention mask (what "one forward" means for Pixtral there);
- **padded, same size**: images of one size as a real batch ``[B, patches, hidden]`` through the
  tower's layers with shared rotary positions and no mask (only possible when every image has the
  same grid), checked against the singles' features.

Medians of ``--rounds``; the answer decides whether cross-request batching is worth building here.

    .venv/bin/python benchmarks/vision_batch.py [--images 16] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForImageTextToText

from vlmlab.nano import checkpoint_path

MIXED = [(192, 128), (160, 192), (192, 192), (112, 96), (176, 144), (192, 112), (128, 128), (96, 160)]


def timed(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint_path())).eval()
    tower = model.model.vision_tower
    n = args.images
    mixed = [MIXED[i % len(MIXED)] for i in range(n)]
    mixed_pixels = [torch.randn(1, 3, h, w) for h, w in mixed]
    same_pixels = torch.randn(n, 3, 144, 192)

    @torch.inference_mode()
    def singles(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            model.model.get_image_features(pixel_values=p, image_sizes=torch.tensor([list(p.shape[-2:])]), return_dict=True).pooler_output[0]
            for p in pixels
        ]

    @torch.inference_mode()
    def packed() -> None:
        height, width = max(h for h, _ in mixed), max(w for _, w in mixed)
        canvas = torch.zeros(n, 3, height, width)
        for i, p in enumerate(mixed_pixels):
            canvas[i, :, : p.shape[-2], : p.shape[-1]] = p[0]
        model.model.get_image_features(pixel_values=canvas, image_sizes=torch.tensor(mixed), return_dict=True)

    @torch.inference_mode()
    def padded_same_size() -> list[torch.Tensor]:
        embeds = tower.patch_conv(same_pixels)
        rows, cols = embeds.shape[-2:]
        embeds = tower.ln_pre(embeds.flatten(2).transpose(1, 2))
        grid_h, grid_w = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        positions = tower.patch_positional_embedding(embeds, torch.stack([grid_h.flatten(), grid_w.flatten()], dim=-1))
        hidden = tower.transformer(embeds, attention_mask=None, position_embeddings=positions).last_hidden_state
        return list(model.model.multi_modal_projector(hidden))

    same_list = [same_pixels[i : i + 1] for i in range(n)]
    difference = max((a - b).abs().max().item() for a, b in zip(singles(same_list), padded_same_size()))
    single_mixed = timed(lambda: singles(mixed_pixels), args.rounds)
    packed_mixed = timed(packed, args.rounds)
    single_same = timed(lambda: singles(same_list), args.rounds)
    padded_same = timed(padded_same_size, args.rounds)
    print(f"nano vision tower, {n} images, {args.threads} thread(s), medians of {args.rounds} rounds")
    print(f"  mixed sizes: singles {single_mixed:.1f} ms, packed (transformers, block mask) {packed_mixed:.1f} ms: packed is {single_mixed / packed_mixed:.2f}x singles")
    print(f"  one size (192x144): singles {single_same:.1f} ms, padded batch {padded_same:.1f} ms: {single_same / padded_same:.2f}x; largest feature difference {difference:.1e}")
    print(f"  per image alone: {single_same / n:.2f} ms")


if __name__ == "__main__":
    main()
