"""hpcopt: asynchronous elastic-averaging training under MPI.

In Python (a notebook), after `hpcopt train ... --out runs/mine` and `hpcopt analyze runs/mine`:

    import hpcopt
    model = hpcopt.load_model("runs/mine")          # the final center: the nn.Module, eval mode
    results = hpcopt.load_analysis("runs/mine")     # runs/mine/analysis/analysis.h5 as dicts of arrays
    from hpcopt.analyze import analyze
    figs = hpcopt.figures(analyze("runs/mine"))     # the report's figures as matplotlib Figures

and in your own PyTorch training loop, a trajectory `hpcopt analyze` reads like its own runs':

    rec = hpcopt.Recorder("runs/plain", model, every=50, model_factory="cnn1d", data="mnist1d")
    rec.step(loss=loss, batch=len(x)); rec.evaluate(acc=acc, loss=test_loss); rec.close()
"""
__version__ = "0.1.0"

# What they need (torch, h5py) is imported when they are first used: `import hpcopt` (and so
# every `hpcopt` command) stays cheap.
_LAZY = {"load_model": ("hpcopt.export", "load_model"),
         "load_analysis": ("hpcopt.analyze.store", "read_results"),
         "figures": ("hpcopt.analyze.report", "figures"),
         "Recorder": ("hpcopt.record", "Recorder")}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hpcopt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
