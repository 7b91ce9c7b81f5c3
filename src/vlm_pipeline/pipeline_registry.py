"""The registered pipelines: ``lora``, ``full_ft`` and ``__default__`` (= ``lora``).

Both variants are the same five-stage template; the variant is a Kedro namespace, so its outputs land
under ``data/0X_*/<variant>/`` and its method parameters under ``<variant>.method`` in ``conf/``.

Each stage is a namespace too, named as its tag (the DVC stage), which groups its nodes without renaming a dataset
(``prefix_datasets_with_namespace=False``): Kedro-Viz draws ``data_validation``, ``preprocessing`` and, inside each
variant, ``training``, ``adapter``, ``evaluation`` as modular pipelines (node ``lora.training.train_model``,
dataset ``lora.trained_model``). The variant stays the outer namespace, as Kedro wants a dotted dataset name to
start with its node's top-level namespace. ``build_run_context`` serves every model stage and stays outside them.
"""

from kedro.pipeline import Pipeline

from vlm_pipeline.pipelines import adapter, data_validation, evaluation, preprocessing, run_context, training

VARIANTS = ("lora", "full_ft")


def build_chain(variant: str) -> Pipeline:
    """The whole chain for one fine-tuning variant: the run context, shared data stages, namespaced model stages."""
    return (
        run_context.create_pipeline()
        + data_validation.create_pipeline()
        + preprocessing.create_pipeline()
        + training.create_pipeline(variant)
        + adapter.create_pipeline(variant)
        + evaluation.create_pipeline(variant)
    )


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {variant: build_chain(variant) for variant in VARIANTS}
    pipelines["__default__"] = pipelines["lora"]
    return pipelines
