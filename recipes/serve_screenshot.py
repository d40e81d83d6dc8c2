"""The screenshot of the page of `hf-geocomp serve` in docs/serve.md, taken in headless Debian chromium.

    python recipes/serve_screenshot.py --base smollm2-135m --compressed runs/smollm2-135m-geocomp -o docs/img/serve.png

Serves both models in this process (127.0.0.1, a free port), opens the page with Playwright pointed at
/usr/bin/chromium (apt-get install -y chromium; no browser is downloaded), generates once and saves the page.
"""

from __future__ import annotations

import argparse

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def main() -> None:
    from playwright.sync_api import sync_playwright

    from hf_geocomp.serve.cli import in_thread
    from hf_geocomp.serve.config import ServeConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--compressed", default="runs/smollm2-135m-geocomp")
    p.add_argument("--prompt", default="To be, or not to be, that is the question:")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("-o", "--output", default="docs/img/serve.png")
    args = p.parse_args()
    with in_thread(ServeConfig(base=args.base, compressed=args.compressed)) as (url, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1180, "height": 900})
        page.goto(url + "/")
        page.wait_for_selector("#out-compressed")
        page.fill("#prompt", args.prompt)
        page.fill("#max-new-tokens", str(args.max_new_tokens))
        page.click("#generate")
        for name in ("base", "compressed"):
            page.wait_for_selector(f"#stats-{name}[data-done='1']", timeout=300_000)
        page.screenshot(path=args.output, full_page=True)
        browser.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
