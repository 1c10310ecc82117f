"""Runs an exported step without hybridssm (quoted in README "Real time"; run by test_export.py).

Usage: python aoti_loader.py PACKAGE.pt2 FRAMES.pt OUT.pt, FRAMES.pt = (frames, dones) lists.
"""

import sys

import torch
import torch._inductor

path, frames_path, out_path = sys.argv[1:4]
frames, dones = torch.load(frames_path, weights_only=True)
outputs = []
# -- README --
pkg = torch._inductor.aoti_load_package(path)            # written by hs.export_step(model, path)
init = torch.load(path + ".init.pt", weights_only=True)  # the leaves of init_state(batch_size)
leaves = [t.clone() for t in init]
with torch.inference_mode():
    for x_t, done in zip(frames, dones):                  # x_t [batch_size, embed_dim], done [batch_size]
        # rows whose episode ended restart from the initial state (what step(reset=done) does)
        leaves = [torch.where(done.view(-1, *[1] * (t.dim() - 1)), i, t) for t, i in zip(leaves, init)]
        y_t, *leaves = pkg(x_t, *leaves)
        outputs.append(y_t)
# -- end --
torch.save(outputs, out_path)
