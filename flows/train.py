"""Stage 'train' alone as a Prefect flow::

    python -m flows.train --config configs/demo.yaml --run-dir runs/demo
"""

from flows.stage import main, make_stage_flow

flow = make_stage_flow("train")

if __name__ == "__main__":
    main("train")
