"""The admin page in a real browser: Debian's chromium, headless, driven by Playwright.

A real relay with fake upstreams records traffic; the page must show the numbers the store holds (the fleet's
day in its cards, every relay by its heartbeat), draw them in the per-day chart, refresh by itself, filter
the recent calls by key, save a weight edit without touching the node's key or stats (and not offer to edit
what the nodes file sets), and delete a node no file names. Without chromium (or the playwright package) this
skips locally and fails under CI=true; ``./run.sh test`` installs chromium when it can.
``CODEX_UPDATE_SCREENSHOT=1`` also writes the screenshots to docs/admin.png (the whole page: the README and
observability.md show it) and docs/admin-fleet.png (the cards, nodes and relays).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from store.config import node_from_mapping
from store.engine import make_engine
from store.nodes import release_unnamed, upsert_nodes
from store.records import InvocationRecord, Usage, utcnow
from store.relays import Beat, beat
from store.schema import codex_invocations, nodes, relays
from store.stats import Filters, per_hour
from store.write.batch import apply_batch
from tests.support.calls import call, write_nodes
from tests.support.ci import unavailable
from tests.support.fakeupstream import FakeUpstream
from tests.support.relayproc import ROOT, RelayProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "admin.png"
FLEET_SCREENSHOT = ROOT / "docs" / "admin-fleet.png"
# Live calls through the relay (input, cached, output, reasoning); all on node "a" (b has weight 0).
LIVE = [(1200, 800, 300, 100), (2400, 2000, 500, 200), (900, 0, 150, 0)]
# The narrowest screen the page is laid out for (issue 30): a laptop's.
VIEWPORT = {"width": 1280, "height": 800}
# Every call of the test is the client key "team" (tests.support.calls.call sends "client-key"), with two limits.
KEYS = '[[keys]]\nname = "team"\nkey = "client-key"\ndaily_requests = 100\nmonthly_cost = 0.05\n'


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not installed (./run.sh test installs Debian's chromium when run as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture
def browser():
    reason = _browser_missing()
    if reason:
        unavailable("the browser test", reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield b
        finally:
            b.close()


def history(today: dt.date) -> list[InvocationRecord]:
    """Earlier days, so the chart has bars of two sources; node b's calls give it stats to keep."""
    out = []
    for back, source, node, inp, out_tokens in [(1, "relay", "b", 5000, 1000), (1, "xy", "b", 2000, 500),
                                                (3, "relay", "a", 3000, 700), (5, "xy", "b", 4000, 800)]:
        out.append(InvocationRecord(
            invoke_id=uuid.uuid4().hex, occurred_at=dt.datetime.combine(today - dt.timedelta(days=back), dt.time(9)),
            source=source, endpoint="/v1/responses", status="success", node_id=node, api_format="responses",
            model="gpt-5-codex", stream=True, http_status=200,
            usage=Usage(input_tokens=inp, cached_tokens=inp // 2, output_tokens=out_tokens), ttfb_ms=400,
            stream_ms=2000, response_bytes=4000))
    return out


def assert_fits_the_screen(page) -> None:
    """Each node's buttons are on screen as loaded, and the document does not scroll sideways."""
    buttons = page.locator('#nodes tbody tr[data-node]:not([data-node=""]) button')
    assert buttons.count() >= 2 * page.locator('#nodes tbody tr[data-node]:not([data-node=""])').count()
    for i in range(buttons.count()):
        box = buttons.nth(i).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"], \
            (buttons.nth(i).text_content(), box)
        assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], (buttons.nth(i).text_content(), box)
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth"), \
        page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
    # Nor does the node table inside its box: every column in view (its buttons would stay anyway: sticky).
    assert page.evaluate("(s => s.scrollWidth <= s.clientWidth)(document.querySelector('#nodes').parentElement)")


@pytest.mark.slow
def test_admin_page_shows_stats_and_edits_a_node(sqlite_url, tmp_path, browser):
    from playwright.sync_api import expect

    today = dt.datetime.now(dt.UTC).date()
    with FakeUpstream("a") as a, FakeUpstream("b") as b:
        # a's entry leaves its weight to the page; b's sets weight 0.
        nodes_file = tmp_path / "nodes.toml"
        nodes_file.write_text(f'[[nodes]]\nid = "a"\nbase_url = "{a.base_url}"\napi_key = "key-a-0123456789"\n\n'
                              f'[[nodes]]\nid = "b"\nbase_url = "{b.base_url}"\napi_key = "key-b-9876543210"\n'
                              'weight = 0\n')
        keys_file = tmp_path / "keys.toml"
        keys_file.write_text(KEYS)
        options = {"codex_nodes": str(nodes_file), "codex_ping_interval": "0", "codex_retries": "0",
                   "codex_client_keys": f"@{keys_file}"}
        with RelayProcess(db_url=sqlite_url, options=options) as relay:
            engine = make_engine(sqlite_url)
            try:
                with engine.begin() as conn:
                    apply_batch(conn, history(today))
                    # What a node removed from the nodes file leaves: its row (and stats), from the file, no longer
                    # the file's once a relay started without it.
                    upsert_nodes(conn, [node_from_mapping({"id": "gone", "name": "gone node", "weight": 1,
                                                           "base_url": "http://127.0.0.1:9/v1",
                                                           "api_key": "key-gone-000011112222"}, "node")])
                    release_unnamed(conn, ["a", "b"])
                    # A second relay that died an hour ago: the row its last heartbeat left.
                    beat(conn, Beat(relay="relay-2.internal:8000", name="eu-2", version="0.1.0", pid=4242,
                                    started_at=utcnow() - dt.timedelta(days=2), interval_s=5.0,
                                    writer={"db_ok": True, "queued": 0, "written": 18211, "spooled": 0}))
                    conn.execute(sa.update(relays).where(relays.c.relay == "relay-2.internal:8000")
                                 .values(seen_at=utcnow() - dt.timedelta(hours=1)))
                for usage in LIVE:
                    assert call(relay, "responses", stream=True, usage=usage)[0] == 200
                a.behaviour.status = 500
                assert call(relay, "responses", stream=True, usage=(1, 0, 1, 0))[0] == 500
                a.behaviour.status = 200

                def count_today():
                    with engine.connect() as conn:
                        return conn.execute(sa.select(sa.func.count()).select_from(codex_invocations).where(
                            codex_invocations.c.occurred_at >= dt.datetime.combine(today, dt.time()))).scalar()

                wait_for(lambda: count_today() == len(LIVE) + 1, what="the relay to store its calls")

                page = browser.new_page(viewport=VIEWPORT)
                page.goto(relay.url + "/admin")
                node_a = page.locator('#nodes tr[data-node="a"]')

                def col(row, name):
                    return row.locator(f'[data-col="{name}"]')

                # Today's cards: the fleet's day from the database (3 calls and 1 failed, of one relay here).
                card = page.locator("#overview .card")
                expect(page.locator('#overview [data-card="requests"] b')).to_have_text(str(len(LIVE) + 1))
                expect(page.locator('#overview [data-card="error_rate"] b')).to_have_text("25.0%")
                expect(page.locator('#overview [data-card="tokens"] b')).to_have_text(
                    f"{sum(u[0] + u[2] for u in LIVE):,}")
                expect(page.locator('#overview [data-card="cost"] b')).to_have_text(re.compile(r"^\$0\.\d{2,4}$"))
                expect(page.locator('#overview [data-card="ttfb_p95_ms"] b')).to_have_text(re.compile(r"^\d+ ms$"))
                assert card.count() == 5

                # Relays: this one, running, with its writer; the dead one, gone.
                this = page.locator("#relays tbody tr").filter(has_text="(this one)")
                expect(col(this, "state")).to_have_text("running")
                expect(col(this, "writer")).to_have_text("ok")
                dead = page.locator('#relays tr[data-relay="relay-2.internal:8000"]')
                expect(col(dead, "state")).to_have_text("gone")
                expect(col(dead, "written")).to_have_text("18,211")
                expect(page.locator("#relays tbody tr")).to_have_count(2)
                expect(page.locator('#relays tfoot [data-col="name"]')).to_have_text("fleet (1 running)")

                # A node the relay does not route says so, whatever its stored status, and the page says why.
                gone = page.locator('#nodes tr[data-node="gone"]')
                expect(col(gone, "status")).to_have_text("not routed")
                expect(page.locator("#nodes-note")).to_be_visible()
                expect(page.locator("#nodes-note")).to_contain_text("removed from the nodes file")
                assert_fits_the_screen(page)

                # Node table: today's live calls plus a's history, as the store has them.
                expect(col(node_a, "requests")).to_have_text("5")
                expect(col(node_a, "failures")).to_have_text("1")
                expect(col(node_a, "health")).to_have_text("80.0%")
                expect(col(node_a, "input_tokens")).to_have_text(f"{sum(u[0] for u in LIVE) + 3000:,}")
                # The prompt cache's share: cached ÷ input tokens (history: half of its input cached).
                expect(col(node_a, "cache_hit_rate")).to_have_text(
                    f"{(sum(u[1] for u in LIVE) + 1500) / (sum(u[0] for u in LIVE) + 3000):.1%}")
                expect(col(node_a, "status")).to_have_text("active")
                expect(col(node_a, "key")).to_have_text("key-…6789")
                node_b = page.locator('#nodes tr[data-node="b"]')
                expect(col(node_b, "weight")).to_have_text("0")
                expect(col(node_b, "requests")).to_have_text("3")
                assert "key-a-0123456789" not in page.content()

                # Money as money: the key's cost limit in dollars, no raw float anywhere in the money panels.
                team = page.locator('#keys tr[data-key="team"]')
                expect(col(team, "limits").locator("div")).to_have_text(
                    ["daily_requests 4 / 100", re.compile(r"^monthly_cost \$0\.\d{2,4} / \$0\.05$")])
                expect(col(team, "limits").locator("div").first).to_have_attribute("title", re.compile("^resets 20"))
                expect(col(team, "cost")).to_have_text(re.compile(r"^\$0\.\d{2,4}$"))
                expect(col(team, "cache_hit_rate")).to_have_text(
                    f"{sum(u[1] for u in LIVE) / sum(u[0] for u in LIVE):.1%}")
                for panel in ("#overview", "#models", "#sources", "#keys", "#recent"):
                    assert not re.search(r"\d\.\d{5}", page.locator(panel).inner_text()), panel
                assert page.evaluate("""[limitText("monthly_cost", {used: 0.053743549999999994, limit: 0.05}),
                    usd(0.0034), usd(1234.5), usd(0), usd(null)]""") == \
                    ["monthly_cost $0.05 / $0.05", "$0.0034", "$1,234.50", "$0.00", "–"]

                # Recent calls: each with its key (the history's had none); the panel filters by key and model.
                expect(page.locator('#recent tbody [data-col="client_key"]')).to_have_text(
                    ["team"] * (len(LIVE) + 1) + ["–"] * len(history(today)))
                recent = page.locator("#recent-form")
                recent.locator('[name="key"]').fill("nobody")
                recent.locator('button[type="submit"]').click()
                expect(page.locator("#recent tbody")).to_have_text("nothing recorded")
                recent.locator('[name="key"]').fill("team")
                recent.locator('[name="model"]').fill("gpt-5-codex")
                recent.locator('button[type="submit"]').click()
                expect(page.locator("#recent tbody tr")).to_have_count(len(LIVE) + 1)

                # Chart: one bar segment per day and source, sized by the day's total tokens.
                live_tokens = sum(u[0] + u[2] for u in LIVE)  # the failed call has no usage
                expected = {(today.isoformat(), "relay"): live_tokens,
                            ((today - dt.timedelta(days=1)).isoformat(), "relay"): 6000,
                            ((today - dt.timedelta(days=1)).isoformat(), "xy"): 2500,
                            ((today - dt.timedelta(days=3)).isoformat(), "relay"): 3700,
                            ((today - dt.timedelta(days=5)).isoformat(), "xy"): 4800}
                bars = page.locator("#chart-tokens rect[data-source]")
                expect(bars).to_have_count(len(expected))
                drawn = {(bars.nth(i).get_attribute("data-day"), bars.nth(i).get_attribute("data-source")):
                         int(bars.nth(i).get_attribute("data-value")) for i in range(bars.count())}
                assert drawn == expected
                req = page.locator(f'#chart-requests rect[data-day="{today.isoformat()}"][data-source="relay"]')
                assert req.get_attribute("data-value") == str(len(LIVE) + 1)
                heights = {k: float(bars.nth(i).get_attribute("height")) for i, k in enumerate(drawn)}
                tallest = max(expected, key=expected.get)
                assert heights[tallest] == max(heights.values())  # bars scale with their numbers
                assert page.locator("#days tbody tr").count() == len(expected)

                # Per hour, latest first: the live calls' hour with its TTFB percentiles (issue 15.3).
                with engine.connect() as conn:
                    [latest] = per_hour(conn, Filters(since=today))[-1:]
                hour_row = page.locator("#hours tbody tr").first
                expect(hour_row).to_have_attribute("data-key", latest.hour)
                expect(col(hour_row, "requests")).to_have_text(str(latest.requests))
                expect(col(hour_row, "ttfb_p95_ms")).to_have_text(f"{latest.ttfb_p95_ms:,}")
                # ... and the chart draws the three percentile lines over the same hours.
                assert page.locator("#chart-hours polyline").count() == 3
                # One hour of data is three dots (a line needs two points).
                assert page.evaluate("""(() => {
                    const svg = document.createElementNS(SVG, "svg");
                    drawLines(svg, ["2026-12-07 09:00"], [["p50", [80]], ["p95", [120]], ["p99", [130]]], "ms");
                    return [svg.querySelectorAll("polyline").length, svg.querySelectorAll("circle").length];
                })()""") == [0, 3]

                # The page refreshes itself: a new call shows up without a reload.
                page.select_option("#refresh", "5")
                assert call(relay, "responses", stream=True, usage=(10, 0, 5, 0))[0] == 200
                expect(col(node_a, "requests")).to_have_text("6", timeout=20_000)

                # Edit a's weight through the form: saved in the DB, key and stats untouched.
                page.select_option("#refresh", "0")
                with engine.connect() as conn:
                    before = conn.execute(sa.select(nodes).where(nodes.c.id == "a")).one()
                node_a.locator('button[data-action="edit"]').click()
                expect(page.locator("#node-form-title")).to_have_text("Edit node a")
                # What the nodes file sets is the file's: shown, not editable; the weight it leaves out is.
                for name in ("base_url", "api_key"):
                    expect(page.locator(f'#node-form input[name="{name}"]')).to_have_attribute("readonly", "")
                expect(page.locator('#node-form input[name="weight"]')).not_to_have_attribute("readonly", "")
                page.fill('#node-form input[name="weight"]', "5")
                page.click('#node-form button[type="submit"]')
                expect(page.locator("#message")).to_have_text("Node a saved: weight 5.")
                expect(col(node_a, "weight")).to_have_text("5")
                with engine.connect() as conn:
                    after = conn.execute(sa.select(nodes).where(nodes.c.id == "a")).one()
                assert after.weight == 5 and after.api_key == "key-a-0123456789"
                for name in ("requests", "fail_count", "total_input", "total_output", "total_bytes", "first_byte_ms"):
                    assert getattr(after, name) == getattr(before, name), name

                # Disable b from the page: the badge and the database agree.
                node_b.locator('button[data-action="disable"]').click()
                expect(col(node_b, "status")).to_have_text("disabled")
                page.evaluate("window.scrollTo(0, 0)")
                assert_fits_the_screen(page)  # with the Enable button, and after the form's edit
                with engine.connect() as conn:
                    assert conn.execute(sa.select(nodes.c.disabled).where(nodes.c.id == "b")).scalar()

                shot, fleet_shot = tmp_path / "admin.png", tmp_path / "admin-fleet.png"
                page.screenshot(path=str(shot), full_page=True)
                # The fleet's panels: from the cards to the end of the relays panel.
                box = page.locator("#relays-section").bounding_box()
                height = box["y"] + box["height"] + 8
                page.screenshot(path=str(fleet_shot), full_page=True,
                                clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height})
                for png in (shot, fleet_shot):
                    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                if os.environ.get("CODEX_UPDATE_SCREENSHOT") == "1":
                    shutil.copyfile(shot, SCREENSHOT)
                    shutil.copyfile(fleet_shot, FLEET_SCREENSHOT)

                # Delete the node no file names any more, from its form: gone from every panel (it had no calls).
                # A node the file names has no Delete: the next start would add it again.
                node_a.locator('button[data-action="edit"]').click()
                expect(page.locator("#node-form-delete")).to_be_hidden()
                page.on("dialog", lambda dialog: dialog.accept())
                gone.locator('button[data-action="edit"]').click()
                page.click("#node-form-delete")
                expect(page.locator("#message")).to_have_text("Node gone deleted.")
                expect(gone).to_have_count(0)
            finally:
                engine.dispose()


@pytest.mark.slow
def test_admin_page_adds_edits_and_revokes_a_key(sqlite_url, tmp_path, browser):
    from playwright.sync_api import expect

    with FakeUpstream("a") as a:
        nodes_file = write_nodes(tmp_path / "nodes.toml", [("a", a.base_url, "key-a-0123456789", 1)])
        keys_file = tmp_path / "keys.toml"
        keys_file.write_text(KEYS)
        options = {"codex_nodes": str(nodes_file), "codex_ping_interval": "0", "codex_client_keys": f"@{keys_file}"}
        with RelayProcess(db_url=sqlite_url, options=options) as relay:
            page = browser.new_page(viewport=VIEWPORT)
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(relay.url + "/admin")
            team = page.locator('#stored-keys tr[data-key="team"]')
            expect(team.locator('[data-col="source"]')).to_have_text("file")
            expect(team.locator('[data-action="rotate"]')).to_have_count(0)  # a file key's secret is the file's
            # The limits the keys file sets are the file's: shown, not editable; the others are the page's.
            team.locator('[data-action="edit"]').click()
            for name in ("daily_requests", "monthly_cost"):
                expect(page.locator(f'#key-form [name="{name}"]')).to_have_attribute("readonly", "")
            expect(page.locator('#key-form [name="rpm"]')).not_to_have_attribute("readonly", "")
            page.click("#key-form-reset")

            form = page.locator("#key-form")
            form.locator('[name="name"]').fill("dana")
            form.locator('[name="models"]').fill("gpt-5*, o3")
            form.locator('[name="rpm"]').fill("3")
            form.locator('button[type="submit"]').click()
            expect(page.locator("#message")).to_contain_text("shown this once: crk-")
            secret = re.search(r"crk-\S+", page.locator("#message").inner_text()).group(0)
            dana = page.locator('#stored-keys tr[data-key="dana"]')
            expect(dana.locator('[data-col="limits"] div')).to_have_text(["models gpt-5*, o3", "rpm 3"])
            assert call(relay, "responses", stream=False, usage=(1, 0, 1, 0),
                        headers={"authorization": f"Bearer {secret}"})[0] == 200

            dana.locator('[data-action="edit"]').click()
            form.locator('[name="rpm"]').fill("")
            form.locator('[name="daily_requests"]').fill("50")
            form.locator('[name="budgets"]').fill("5h:requests=20; weekly:cost=2:claude-opus-*")
            form.locator('[name="warn_at"]').fill("0.8")
            form.locator('button[type="submit"]').click()
            expect(dana.locator('[data-col="limits"] div')).to_have_text([
                "models gpt-5*, o3", "daily_requests 50", "budgets 5h:requests=20; weekly:cost=2:claude-opus-*",
                "warn_at 0.8"])

            dana.locator('[data-action="revoke"]').click()
            expect(dana.locator('[data-col="state"]')).to_have_text("revoked")
            assert call(relay, "responses", stream=False, usage=(1, 0, 1, 0),
                        headers={"authorization": f"Bearer {secret}"})[0] == 401
            page.reload()
            assert secret not in page.content()  # shown once: no read of the page has it again
