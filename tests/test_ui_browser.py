"""The Dagster UI in a real headless Chromium, driven by Playwright: what a person sees and clicks.

The `dagster_ui` fixture (tests/conftest.py) ran `turbofan demo --units 1-3` and serves `turbofan ui`
(`dagster dev`: webserver, code server, daemon) on a free port; tests/browser.py has the browser.
Every wait is one of Playwright's auto-retrying `expect` assertions; when one fails, a screenshot
of the page lands in the test's artifacts (`test-artifacts/<test>/`) and the failure message
names it. The pages a user comes for are saved there too.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import artifacts_of, chromium, ui_page
from conftest import DagsterUI
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from playwright.sync_api import Browser, Locator, Page, Response, expect
from playwright.sync_api import Error as PlaywrightError

from turbofan_assets.definitions import defs

CODE_LOCATION = "turbofan_assets.definitions"
# Generous: two loaded cores serve the webserver, the code server, the daemon and the browser.
UI_TIMEOUT_MS = 60_000
# A run from the UI is queued, dequeued by the daemon, then executed in a new worker process.
RUN_TIMEOUT_MS = 240_000
TERMINAL_RUN_TITLE = re.compile(r"\[(SUCCESS|FAILURE|CANCELED)\]")

expect.set_options(timeout=UI_TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Browser, dagster_ui: DagsterUI) -> Iterator[Page]:
    with ui_page(browser, dagster_ui.url, UI_TIMEOUT_MS) as page:
        yield page


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    return artifacts_of(request)


@contextlib.contextmanager
def screenshot_on_failure(page: Page, path: Path, ui: DagsterUI) -> Iterator[None]:
    """Turn a failed check into an AssertionError naming a screenshot of the page as it was."""
    try:
        yield
    except (AssertionError, PlaywrightError) as exc:
        try:
            page.screenshot(path=str(path), full_page=True)
            shot = f"screenshot of the page: {path}"
        except PlaywrightError as shot_error:
            shot = f"no screenshot ({shot_error})"
        raise AssertionError(
            f"{exc}\n\n{shot}\npage: {page.url}\nend of the UI log ({ui.log_path}):\n{ui.log_tail(2000)}"
        ) from exc


def graph_node(page: Page, asset: str | re.Pattern[str]) -> Locator:
    """A node of the lineage graph (an SVG foreignObject) showing `asset` as its whole text line."""
    return page.locator("svg foreignObject").filter(has=page.get_by_text(asset, exact=True))


def shown_name(asset: str) -> re.Pattern[str]:
    """What a zoomed-out graph shows for `asset`: the name, or its ends around a middle ellipsis.

    telemetry_quarantine -> teleme…_quarantine (the full name is the node's tooltip).
    """
    any_prefix = "".join(f"(?:{re.escape(c)}" for c in asset) + ")?" * len(asset)
    any_suffix = "(?:" * len(asset) + "".join(f"{re.escape(c)})?" for c in asset)
    return re.compile(rf"^(?:{re.escape(asset)}|{any_prefix}…{any_suffix})$")


def test_lineage_shows_every_asset_and_what_is_materialized(
    page: Page, dagster_ui: DagsterUI, artifacts: Path
) -> None:
    groups: dict[str, list[str]] = {}
    for spec in defs.resolve_all_asset_specs():
        groups.setdefault(spec.group_name, []).append(spec.key.to_user_string())
    assert {"raw_telemetry", "telemetry_quarantine", "failure_events"} <= set(groups["ingestion"])
    assert {"rul_labels", "reference_test_fleet"} <= set(groups["preparation"])

    with screenshot_on_failure(page, artifacts / "lineage.png", dagster_ui):
        # "Lineage" in the navigation: the whole graph, one collapsed box per group at first.
        page.goto("/asset-groups")
        for group in groups:
            expect(graph_node(page, group)).to_be_visible()
        page.get_by_role("button", name="settings", exact=True).click()
        page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
        page.keyboard.press("Escape")
        expect(page.get_by_role("menu")).to_be_hidden()
        for assets in groups.values():
            for asset in assets:
                expect(graph_node(page, shown_name(asset))).to_be_visible()
        page.screenshot(path=str(artifacts / "lineage.png"))

    # A group's own page draws full nodes: the whole name, then the latest status. The demo ran
    # the ingestion and preparation assets, so a user sees them materialized (but the quarantine:
    # the demo's fleet sends nothing malformed, and an unchanged table is not materialized).
    for group, assets in groups.items():
        with screenshot_on_failure(page, artifacts / f"group-{group}.png", dagster_ui):
            page.goto(f"/locations/{CODE_LOCATION}/asset-groups/{group}")
            for asset in assets:
                node = graph_node(page, asset)
                expect(node).to_be_visible()
                if group in ("ingestion", "preparation") and asset != "telemetry_quarantine":
                    expect(node.get_by_text("Materialized", exact=True)).to_be_visible()


def _is_launch(response: Response) -> bool:
    request = response.request
    return (
        request.method == "POST"
        and (request.post_data_json or {}).get("operationName") == "LaunchPipelineExecution"
    )


def test_materialize_button_runs_the_asset(page: Page, dagster_ui: DagsterUI, artifacts: Path) -> None:
    asset = AssetKey("rul_labels")
    instance_dir = str(dagster_ui.home / "dagster")
    with DagsterInstance.from_config(instance_dir) as instance:
        [before] = instance.fetch_materializations(asset, limit=1).records  # the demo's

    with screenshot_on_failure(page, artifacts / "materialize.png", dagster_ui):
        page.goto(f"/assets/{asset.to_user_string()}")
        # Its accessible name is "materialization Materialize" (icon, then label).
        materialize = page.get_by_role("button", name=re.compile(r"Materialize$"))
        expect(materialize).to_be_enabled()
        with page.expect_response(_is_launch) as launch:
            materialize.click()
        launched = launch.value.json()["data"]["launchPipelineExecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["id"]

        # The confirmation toast names the run and links to it.
        toast = page.get_by_role("region", name=re.compile("Notifications"))
        expect(toast).to_contain_text(f"Launched run {run_id[:8]}")
        toast.get_by_role("link", name="View").click()
        expect(page).to_have_url(re.compile(rf"/runs/{run_id}$"))
        # The run page follows the run live (queued, started, ...); its title carries the status.
        expect(page).to_have_title(TERMINAL_RUN_TITLE, timeout=RUN_TIMEOUT_MS)
        assert "[SUCCESS]" in page.title(), f"the run did not succeed: {page.title()!r}"
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()

    # The instance the UI serves recorded it: a successful run of that asset, and its newest
    # materialization comes from this run.
    with DagsterInstance.from_config(instance_dir) as instance:
        record = instance.get_run_record_by_id(run_id)
        assert record is not None
        assert record.dagster_run.status == DagsterRunStatus.SUCCESS
        assert record.dagster_run.asset_selection == {asset}
        [latest] = instance.fetch_materializations(asset, limit=1).records
        assert latest.run_id == run_id
        assert latest.storage_id > before.storage_id


def test_the_sensors_and_automation_show_their_ticks(
    page: Page, dagster_ui: DagsterUI, artifacts: Path
) -> None:
    """The daemon of `dagster dev` runs every sensor by default; a user sees each running and its
    latest tick (the demo's landing zone is all ingested, so the landing-zone sensor skips)."""
    with screenshot_on_failure(page, artifacts / "automation.png", dagster_ui):
        page.goto("/automation")
        for name in ("landing_zone_sensor", "retrain_policy_sensor", "automation"):
            expect(page.get_by_text(name, exact=True)).to_be_visible()
        page.goto(f"/locations/{CODE_LOCATION}/sensors/landing_zone_sensor")
        # What it is for, in its own words, and the ticks the daemon made: nothing new to ingest.
        expect(page.get_by_role("cell", name=re.compile("^Starts ingestion when files land"))).to_be_visible()
        expect(page.get_by_text("Latest tick", exact=True)).to_be_visible()
        expect(page.get_by_text("0 runs requested", exact=True).first).to_be_visible(timeout=RUN_TIMEOUT_MS)
        page.screenshot(path=str(artifacts / "landing_zone_sensor.png"), full_page=True)


def test_the_model_evaluation_shows_its_picture(page: Page, dagster_ui: DagsterUI, artifacts: Path) -> None:
    with screenshot_on_failure(page, artifacts / "evaluation.png", dagster_ui):
        page.goto("/assets/model_evaluation")
        page.get_by_placeholder("Filter metadata keys").fill("predicted_vs_true")
        page.get_by_text("[Show Markdown]", exact=True).click()  # the picture is Markdown metadata
        picture = page.get_by_role("img", name=re.compile("predicted", re.IGNORECASE)).first
        expect(picture).to_be_visible()
        assert picture.evaluate("image => image.naturalWidth") > 0  # decoded, not a broken image
        page.screenshot(path=str(artifacts / "model_evaluation.png"), full_page=True)


def test_the_deployment_manifest_renders_after_materialising_it(
    page: Page, dagster_ui: DagsterUI, artifacts: Path
) -> None:
    """The demo left a champion; materialising the manifest from the UI shows it as JSON."""
    with screenshot_on_failure(page, artifacts / "manifest.png", dagster_ui):
        page.goto("/assets/edge_deployment_manifest")
        materialize = page.get_by_role("button", name=re.compile(r"Materialize$"))
        expect(materialize).to_be_enabled()
        materialize.click()
        toast = page.get_by_role("region", name=re.compile("Notifications"))
        toast.get_by_role("link", name="View").click()
        expect(page).to_have_title(TERMINAL_RUN_TITLE, timeout=RUN_TIMEOUT_MS)
        assert "[SUCCESS]" in page.title(), f"the run did not succeed: {page.title()!r}"
        page.goto("/assets/edge_deployment_manifest")
        page.get_by_placeholder("Filter metadata keys").fill("manifest")
        page.get_by_text("[Show JSON]", exact=True).click()
        dialog = page.get_by_role("dialog")
        # The manifest as IoT Hub gets it: the agent's and hub's desired properties, the model's hash.
        for text in ("modulesContent", "$edgeAgent", "$edgeHub", "timeToLiveSecs"):
            expect(dialog.get_by_text(text).first).to_be_visible()
        page.screenshot(path=str(artifacts / "deployment_manifest.png"), full_page=True)
