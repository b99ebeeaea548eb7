"""CDK Terrain app: ``python main.py`` (or ``cdktn synth``/``deploy``) writes ``cdktf.out/``.

Run from this folder with the project installed (``pip install -e '.[infra]'``); it imports
``infra_constructs.conventions`` for the names it shares with ``synth.py``.
"""

from cdktn import App
from cluster_stack import STACK_ID, ClusterStack


def main() -> None:
    app = App()
    ClusterStack(app, STACK_ID)
    app.synth()


if __name__ == "__main__":
    main()
