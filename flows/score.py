"""Stage 'score' alone as a Prefect flow::

    python -m flows.score --config configs/demo.yaml --run-dir runs/demo
"""

from flows.stage import main, make_stage_flow

flow = make_stage_flow("score")

if __name__ == "__main__":
    main("score")
