from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.preprocessing.nodes import (
    build_data_report,
    combine_reports,
    hold_out_validation,
    tokenize_split,
)


def create_pipeline(**kwargs) -> Pipeline:
    split_nodes = [
        Node(
            tokenize_split,
            inputs=[f"{split}_records", "run_context", "params:preprocessing"],
            # train is encoded whole, then split into train and validation by the next node
            outputs=[
                "train_encoded" if split == "train" else f"{split}_tokenized@arrow",
                f"{split}_set_aside",
                f"{split}_preprocessing_report",
            ],
            name=f"tokenize_{split}",
        )
        for split in ("train", "test")
    ]
    validation = Node(
        hold_out_validation,
        inputs=["train_encoded", "params:preprocessing"],
        outputs=["train_tokenized@arrow", "validation_tokenized@arrow"],
        name="hold_out_validation",
    )
    report = Node(
        combine_reports,
        inputs=[
            "train_preprocessing_report",
            "train_tokenized@arrow",
            "validation_tokenized@arrow",
            "test_preprocessing_report",
            "run_context",
            "params:sft",
        ],
        outputs="preprocessing_report",
        name="combine_preprocessing_reports",
    )
    data_report = Node(
        build_data_report,
        inputs=[
            "train_validation_report",
            "test_validation_report",
            "preprocessing_report",
            "train_tokenized@arrow",
            "run_context",
            "params:preprocessing",
        ],
        outputs=["data_report_markdown", "data_report_figure"],
        name="build_data_report",
    )
    return Pipeline(
        [*split_nodes, validation, report, data_report],
        tags="preprocessing",
        namespace="preprocessing",
        prefix_datasets_with_namespace=False,
    )
