"""Stage 'gate' alone as a Prefect flow::

    python -m flows.gate --config configs/demo.yaml --run-dir runs/demo
"""

from flows.stage import main, make_stage_flow

flow = make_stage_flow("gate")

if __name__ == "__main__":
    main("gate")
