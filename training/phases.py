"""The phases of a run: their order, where each runs, what each writes, which config sections each reads.

Kept apart from the code of any phase (and free of imports) so that the command line, the run
folder and the training loop share one table.
"""

# The phases of a run: `instanas-train all` runs them in this order; each resumes, or returns at
# once when it has finished.
ORDER = ("baseline", "pretrain", "profile", "search", "finetune", "route", "twins", "multires", "shared_twins", "coadapt", "export", "report")
# Phases that train on every torchrun rank (each reads its shard); the others run on rank 0.
DISTRIBUTED = ("baseline", "twins", "multires", "shared_twins", "coadapt", "pretrain", "finetune")

# The phases whose results depend on each config section; a section not listed (space, data,
# seed, name...) shapes every phase, and `device` and `threads` change no result.
SECTION_PHASES = {"baseline": ("baseline",), "twins": ("twins",), "multires": ("multires",), "shared_twins": ("shared_twins",), "coadapt": ("coadapt",), "pretrain": ("pretrain",),
                  "search": ("search",), "controller": ("search",), "finetune": ("finetune",), "route": ("route",),
                  "profile": ("profile",), "export": (), "report": (), "device": (), "threads": (), "checkpoint_steps": ()}
PHASE_FILES = {"baseline": "baseline.pt", "twins": "twins.pt", "multires": "multires.pt", "shared_twins": "shared_twins.pt", "coadapt": "coadapt.pt", "pretrain": "pretrain.pt",
               "profile": "latency.json", "search": "search.pt", "finetune": "finetune.pt", "route": "route.pt"}
