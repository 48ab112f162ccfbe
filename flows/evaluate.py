"""Stage 'evaluate' alone as a Prefect flow::

    python -m flows.evaluate --config configs/demo.yaml --run-dir runs/demo
"""

from flows.stage import main, make_stage_flow

flow = make_stage_flow("evaluate")

if __name__ == "__main__":
    main("evaluate")
