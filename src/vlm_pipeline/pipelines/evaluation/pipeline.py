from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.evaluation.nodes import (
    build_report,
    check_serving,
    check_tuned_model,
    compare,
    evaluate_model,
    headline_metrics,
    majority_baseline,
)


def create_pipeline(variant: str) -> Pipeline:
    shared = ["run_context", "test_records", "test_tokenized@arrow", "params:preprocessing", "params:evaluation"]
    nodes = [
        Node(evaluate_model, inputs=["base_model", *shared], outputs="base_evaluation", name="evaluate_base"),
        Node(evaluate_model, inputs=["merged_model", *shared], outputs="tuned_evaluation", name="evaluate_tuned"),
        Node(
            check_serving,
            inputs=[
                "merged_model",
                "tuned_evaluation",
                "run_context",
                "test_records",
                "params:preprocessing",
                "params:evaluation",
            ],
            outputs="serving_check",
            name="check_serving",
        ),
        Node(
            majority_baseline,
            inputs=["train_records", "test_records"],
            outputs="majority_baseline",
            name="majority_baseline",
        ),
        Node(
            compare,
            inputs=[
                "base_evaluation",
                "tuned_evaluation",
                "majority_baseline",
                "merge_check",
                "serving_check",
                "test_records",
                "params:evaluation",
            ],
            outputs=["metrics", "evaluation_details", "predictions", "metrics_for_mlflow"],
            name="compare_base_and_tuned",
        ),
        Node(
            headline_metrics,
            inputs=["metrics", "variant"],
            outputs="headline_metrics",
            name="headline_metrics",
        ),
        Node(
            build_report,
            inputs=[
                "metrics",
                "evaluation_details",
                "predictions",
                "training_history",
                "run_context",
                "evaluation_report_folder",
                "variant",
            ],
            outputs=["evaluation_report", "loss_curve", "loss_curve_figure", "comparison_figure"],
            name="build_evaluation_report",
        ),
        Node(
            check_tuned_model,
            inputs=["evaluation_details", "params:evaluation"],
            outputs=None,
            name="check_tuned_model",
        ),
    ]
    return Pipeline(
        Pipeline(nodes, namespace="evaluation", prefix_datasets_with_namespace=False),
        tags="evaluation",
        namespace=variant,
        inputs={"base_model", "run_context", "test_records", "train_records", "test_tokenized@arrow"},
        parameters={"params:preprocessing", "params:evaluation"},
    )
