from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.run_context.nodes import build_run_context

# Every stage that loads a model; `--tags <stage>` (one DVC stage) then still builds the context it reads.
MODEL_STAGES = ("preprocessing", "training", "adapter", "evaluation")


def create_pipeline(**kwargs) -> Pipeline:
    node = Node(
        build_run_context,
        inputs=["base_model", "project_folder", "params:model"],
        outputs="run_context",
        name="build_run_context",
        tags=MODEL_STAGES,
    )
    return Pipeline([node])
