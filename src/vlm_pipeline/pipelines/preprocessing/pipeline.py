from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.preprocessing.nodes import combine_reports, tokenize_split


def create_pipeline(**kwargs) -> Pipeline:
    split_nodes = [
        Node(
            tokenize_split,
            inputs=[f"{split}_records", "base_processor", "params:raw_data", "params:preprocessing", "validation_summary"],
            outputs=[f"{split}_tokenized@arrow", f"{split}_preprocessing_report"],
            name=f"tokenize_{split}",
        )
        for split in ("train", "test")
    ]
    report = Node(
        combine_reports,
        inputs=["train_preprocessing_report", "test_preprocessing_report"],
        outputs="preprocessing_report",
        name="combine_preprocessing_reports",
    )
    return Pipeline([*split_nodes, report], tags="preprocessing")
