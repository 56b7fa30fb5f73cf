"""Downstream adaptation: one registry of methods, each a way to make a backbone learn a new task.

API (the trainer, scripts and benchmarks code against this)::

    from weightgen.adapt import METHODS, get_method, AdaptMethod, trainable_counts
    m = get_method("recast")        # unknown name -> WeightgenError naming the known ones
    m.name, m.description, m.needs_recast
    m.check(model)                  # WeightgenError (one line) if the method does not apply to model
    m.apply(model, seed=None)       # in place, once per backbone: inject the method's modules (LoRA,
                                    # adapters, masks, ...) and set requires_grad (head always trainable);
                                    # the model's function is unchanged at init; adapter inits come
                                    # from CPU generators seeded by ``seed`` (never the global RNG)
    trainable_counts(model)         # {"with_head": int, "without_head": int}
    merge_and_unload(model)         # weightgen.merge_and_unload: a plain dense model (banks merged, LoRA /
                                    # masks folded) or WeightgenError for AdaptFormer / CLR
    export_dense(model)             # weightgen.export_dense: its state dict (model untouched); same refusals
    extend_banks(model, extra, source="random"|"pca"|"vae", seed=0, vae=None)

Methods: ``recast`` (coefficients + head), ``recast-norm`` (+ norm affine parameters), ``linear``
(head only), ``full`` (everything), ``lora`` (LoRA on attention q,v of a ViT / on residual-stage
convs of a CNN), and on top of ``recast``: ``recast+melo`` (LoRA r=1, alpha=4, same targets),
``recast+adaptformer`` (parallel bottleneck adapter on each block's MLP, r=2, scale 4, ReLU),
``recast+clr`` (depthwise 3x3 conv after each RECAST conv, dirac init), ``recast+piggyback``
(real-valued masks on RECAST conv weights, thresholded at 5e-3, straight-through).

Adapters wrap the layer they adapt (``<name>.base_layer``, as peft does) and implement
``weightgen.recasting.Foldable``, so the one ``weightgen.merge_and_unload`` / ``export_dense`` folds
LoRA and Piggyback masks into plain layers and refuses AdaptFormer and CLR, which add computation no
original layer can hold (``merge_and_unload(model, keep_adapters=True)`` merges the banks only and
keeps every adapter working on top of the merged layers).

Task files (``weightgen.save_task``) store what the method trains (every ``requires_grad``
parameter, coefficients always, the head) plus every BatchNorm buffer of the model, so switching
back to a task is exact whatever the next task trained.
"""
from ..recasting import export_dense, merge_and_unload
from .methods import METHODS, AdaptMethod, get_method, trainable_counts
from .extend import extend_banks

__all__ = ["METHODS", "AdaptMethod", "get_method", "trainable_counts", "merge_and_unload", "export_dense",
           "extend_banks"]
