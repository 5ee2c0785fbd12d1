"""One installable package set with the `turbofan` console command.

`pip install .` installs what the edge module needs (requirements-edge.in: no Dagster, DuckDB
or test tools); `pip install ".[pipeline]"` adds the rest of the platform (requirements.in).
The exact versions the project is tested with are pinned in requirements.lock, which
`make install` installs first.
"""

from pathlib import Path

from setuptools import Extension, find_packages, setup

HERE = Path(__file__).parent


def read_requirements(path: Path) -> list[str]:
    """Requirement lines of a pip requirements file, without comments or blank lines."""
    requirements = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            requirements.append(line)
    return requirements


setup(
    name="turbofan",
    version="0.1.0",
    description="Turbofan predictive maintenance: simulator, edge module and Dagster pipeline",
    python_requires=">=3.11",
    packages=find_packages(
        include=[
            "turbofan_core*",
            "turbofan_warehouse*",
            "turbofan_assets*",
            "simulator*",
            "turbofan_cli*",
            "edge_module*",
        ]
    ),
    include_package_data=True,
    # The column decoder of IoT Hub capture blocks, the telemetry contract's fields table, the tree
    # walk, the window statistics with the streaming features' update, the edge store's WAL sync
    # thread and the splitting of a gateway's batch (each file's header says why C).
    ext_modules=[
        Extension("turbofan_core._iothub_avro", ["turbofan_core/_iothub_avro.c"]),
        Extension("turbofan_core._contract", ["turbofan_core/_contract.c"]),
        Extension("turbofan_core._trees", ["turbofan_core/_trees.c"]),
        # No fused multiply-add: the smoothing keeps numpy's bits on every platform.
        Extension(
            "turbofan_core._windows", ["turbofan_core/_windows.c"], extra_compile_args=["-ffp-contract=off"]
        ),
        Extension("edge_module._wal_sync", ["edge_module/_wal_sync.c"]),
        Extension("edge_module._batch", ["edge_module/_batch.c"]),
    ],
    install_requires=read_requirements(HERE / "requirements-edge.in"),
    extras_require={"pipeline": read_requirements(HERE / "requirements.in")},
    entry_points={"console_scripts": ["turbofan=turbofan_cli.main:main"]},
)
