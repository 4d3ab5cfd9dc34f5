# %% [markdown]
# # vismech tutorial: RSA and causal mediation on the shipped organism
#
# A script in percent-cell format: run it as it is (`python examples/tutorial.py`), or open it as a notebook
# (VS Code, Jupyter with jupytext). It loads `organism`, the tiny Qwen2.5-VL that vismech trained and ships, runs
# the paper's RSA (Fig. 1c) and causal mediation analysis (Fig. 1d) on it, and plots both from the returned results.
# It takes about half a minute on two CPU cores; the test suite runs it.

# %%
import os

import numpy as np
import matplotlib.pyplot as plt

import vismech

OUT = os.environ.get("VISMECH_TUTORIAL_OUT", "runs/tutorial")

# %% [markdown]
# Load a model: an HF hub id or a local checkpoint directory works the same way (`dtype="bf16"`,
# `device_map="auto"` for large ones).

# %%
vlm = vismech.load("organism")
print(vlm.name, vlm.n_layers, "layers x", vlm.n_heads, "heads")

# %% [markdown]
# Run two experiments into one run directory. Keyword options set every experiment option of that name (`n` is the
# RSA's K and the CMA's number of pairs); `vismech run rsa --help-options` lists them all. A second call with
# `resume=True` reuses everything already computed.

# %%
res = vismech.run(["rsa", "cma"], vlm=vlm, out=OUT, n=4, n_boot=50, n_null=5, null_samples=200)
print(res)
print("first-token accuracy:", res["rsa"]["first_token_accuracy"])

# %% [markdown]
# Each experiment's summary is a dict; its tables are tidy rows (`res.table(name)`), every one with the same core
# columns (`model, experiment, measure, value, ci_low, ci_high, n`) and then its conditions: here the RSA by layer,
# and every head's mean CMA score with its BH-corrected significance.

# %%
rsa_rows = res.table("rsa")
heads = res.table("cma_heads")
L, H = vlm.n_layers, vlm.n_heads
selection = np.zeros((L, H))
for r in heads:
    if r["condition"] == "id_selection":
        selection[r["layer"], r["head"]] = r["value"]
print("significant ID-selection heads:", sum(r["significant"] for r in heads if r["condition"] == "id_selection"))

# %%
fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
for curve in ("position_prompt", "position_last", "features_last"):
    rows = [r for r in rsa_rows if r["curve"] == curve]
    a.plot([r["layer"] for r in rows], [r["value"] for r in rows], marker="o", label=curve.replace("_", " at "))
    a.fill_between([r["layer"] for r in rows], [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], alpha=0.2)
a.set(xlabel="layer", ylabel="RSA r", title="RSA by layer")
a.legend(fontsize=7)
im = b.imshow(selection, cmap="viridis", aspect="auto")
b.set(xlabel="head", ylabel="layer", title="CMA: ID selection")
fig.colorbar(im, ax=b)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "tutorial.png"), dpi=120)

# %% [markdown]
# The run's own figures (`OUT/figures/`) are drawn from the stored results alone, so they can be redrawn at any
# time without the model: `vismech plot OUT` on the command line, or:

# %%
from vismech.app.replot import replot

print(len(replot(OUT)), "figure files redrawn")
