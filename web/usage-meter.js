// <usage-meter>: a customer's usage of each meter in the current billing period, read from
// usage-meter's API (GET /v1/customers/{id}/usage) with a portal token. One ES module, no
// dependencies, no build step. Budget: 6 KB gzipped (tests/browser/test_budget.py checks it).
//
//   <script type="module" src="https://your.cdn/usage-meter.js"></script>
//   <usage-meter api="https://API_URL" token-url="/usage-token"></usage-meter>
//
// Attributes: api, token (upt_...) or token-url (POST, same-origin credentials, answers
// {"token": ...}), customer (default: the token's own), refresh (seconds, never below
// REFRESH_FLOOR), heading. Events (bubbling, composed): usage-meter:load, usage-meter:error,
// usage-meter:token-expired. The host's `state` attribute: loading, ready, empty, error, expired.

const REFRESH_FLOOR = 30; // seconds: polling never runs more often than this
const EXPIRED = "usage-meter:token-expired";

const CSS = `
:host{all:initial;display:block;font:var(--usage-meter-font,15px/1.45 system-ui,sans-serif);
color:var(--usage-meter-color,#1f2328);--a:var(--usage-meter-accent,#0969da);
--o:var(--usage-meter-over,#b3261e);--m:var(--usage-meter-muted,#57606a)}
:host([hidden]){display:none}
section{background:var(--usage-meter-bg,#fff);border:1px solid var(--usage-meter-border,#d0d7de);
border-radius:var(--usage-meter-radius,8px);padding:1em 1.25em}
header,.top{display:flex;flex-wrap:wrap;gap:.25em 1em;align-items:baseline;justify-content:space-between}
h2,h3,p,ul,dl,dd{margin:0;padding:0}
h2{font-size:1.15em}h3{font-size:1em;font-weight:600}
ul{list-style:none}li{margin-top:1.1em}
.m,dt{color:var(--m)}.m{font-size:.9em}
button{font:inherit;font-size:.9em;color:inherit;background:var(--usage-meter-button-bg,#f6f8fa);
border:1px solid var(--usage-meter-border,#8c959f);border-radius:6px;padding:.2em .8em;cursor:pointer}
:focus-visible{outline:2px solid var(--usage-meter-focus,#0969da);outline-offset:2px}
[role=progressbar]{display:flex;height:var(--usage-meter-bar-height,.7em);margin:.4em 0;
border-radius:99px;overflow:hidden;background:var(--usage-meter-track,#eaeef2);
box-shadow:inset 0 0 0 1px var(--usage-meter-track-border,#6e7781)}
.i{background:var(--a)}
.b{background:repeating-linear-gradient(135deg,#fff4 0 4px,#0000 4px 8px),var(--o)}
dl{display:flex;flex-wrap:wrap;gap:.2em 1.5em;font-size:.9em}
dl div{display:flex;gap:.4em}dd{font-weight:600;font-variant-numeric:tabular-nums}
.x dd,.x dt{color:var(--o)}
.x dt:before{content:"";display:inline-block;width:.7em;height:.7em;margin-right:.3em;
border-radius:2px;background:repeating-linear-gradient(135deg,#fff4 0 2px,#0000 2px 4px),var(--o)}
[part~=status]:not(:empty){margin-top:.8em}
.e{color:var(--o)}.e button{margin-left:.6em}
footer{margin-top:1em}
@media (prefers-reduced-motion:no-preference){[role=progressbar] span{transition:width .3s}}
@media (forced-colors:active){[role=progressbar] span{forced-color-adjust:none}
.i{background:CanvasText}.b{background:Highlight}}`;

let sheet;
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// The claims of a portal token (upt_<base64url JSON>.<signature>), unverified: for the customer
// it reads and when it expires. The API verifies it.
function claims(token) {
  try {
    const body = token.slice(4).split(".")[0].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(body));
  } catch {
    return {};
  }
}

class Refused extends Error {
  constructor(message, status = 0, code = "") {
    super(message);
    Object.assign(this, { status, code });
  }
}

export class UsageMeter extends HTMLElement {
  static REFRESH_FLOOR = REFRESH_FLOOR;
  static observedAttributes = ["api", "token", "token-url", "customer", "refresh", "heading"];
  #root;
  #seq = 0;
  #abort;
  #timer;
  #queued;
  #fetched; // {token, exp} from token-url
  #data = null;

  constructor() {
    super();
    this.#root = this.attachShadow({ mode: "open" });
    if (!sheet) (sheet = new CSSStyleSheet()).replaceSync(CSS);
    this.#root.adoptedStyleSheets = [sheet];
    this.#root.innerHTML = `<section part="container" aria-labelledby="h"><header part="header">
<h2 id="h" part="title"></h2><button type="button" part="refresh">Refresh</button></header>
<div part="status" role="status"></div><div id="b"></div></section>`;
    this.#root.querySelector("[part=refresh]").onclick = () => this.refresh();
    this.#title();
  }

  /** The last usage the API answered, as JSON; null before the first. */
  get usage() {
    return this.#data;
  }

  /** Load the usage again now. */
  refresh() {
    return this.#load();
  }

  connectedCallback() {
    this.#queue();
  }

  disconnectedCallback() {
    this.#abort?.abort();
    clearTimeout(this.#timer);
  }

  attributeChangedCallback(name, old, value) {
    if (name === "heading") return this.#title();
    if (old === value) return;
    if (name === "token-url") this.#fetched = null;
    if (name === "refresh") return this.#schedule();
    this.#queue();
  }

  // Several attributes set at once (or by the parser) make one request.
  #queue() {
    if (this.#queued) return;
    this.#queued = true;
    queueMicrotask(() => {
      this.#queued = false;
      if (this.isConnected) this.#load();
    });
  }

  #title() {
    this.#root.getElementById("h").textContent = this.getAttribute("heading") || "Usage";
  }

  #emit(type, detail) {
    return this.dispatchEvent(new CustomEvent(type, { detail, bubbles: true, composed: true }));
  }

  #state(state) {
    this.setAttribute("state", state);
    this.#root.firstChild.setAttribute("aria-busy", state === "loading");
  }

  #status(text) {
    this.#root.querySelector("[part~=status]").textContent = text;
  }

  async #token(signal, renew) {
    const url = this.getAttribute("token-url");
    if (!url) return this.getAttribute("token");
    const now = Date.now() / 1000;
    if (renew || !this.#fetched || this.#fetched.exp - 30 < now) {
      const r = await fetch(url, { method: "POST", credentials: "same-origin", signal });
      const body = await r.json().catch(() => ({}));
      if (!r.ok || !body.token) throw new Refused(`no token from token-url (${r.status})`, r.status);
      this.#fetched = { token: body.token, exp: claims(body.token).exp || Infinity };
    }
    return this.#fetched.token;
  }

  async #load() {
    const seq = ++this.#seq;
    this.#abort?.abort();
    const { signal } = (this.#abort = new AbortController());
    clearTimeout(this.#timer);
    if (!this.#data) {
      this.#root.getElementById("b").textContent = "";
      this.#state("loading");
      this.#status("Loading usage…");
    } else this.#root.firstChild.setAttribute("aria-busy", true);
    try {
      const api = (this.getAttribute("api") || "").replace(/\/+$/, "");
      if (!api) throw new Refused("the api attribute is missing");
      let r;
      for (const renew of [false, true]) {
        const token = await this.#token(signal, renew);
        if (!token) throw new Refused("no token", 401, "unauthorized");
        const customer = this.getAttribute("customer") || claims(token).sub;
        if (!customer) throw new Refused("no customer: set the customer attribute");
        const url = `${api}/v1/customers/${encodeURIComponent(customer)}/usage`;
        const headers = { Authorization: `Bearer ${token}` };
        r = await fetch(url, { headers, signal, cache: "no-store" });
        if (r.status !== 401 || !this.getAttribute("token-url")) break;
      }
      const body = await r.json().catch(() => ({}));
      if (!r.ok) {
        const { message = `HTTP ${r.status}`, code } = body.error || {};
        throw new Refused(message, r.status, code);
      }
      if (seq !== this.#seq) return;
      this.#data = body;
      this.#render(body);
      this.#emit("usage-meter:load", body);
    } catch (error) {
      if (seq !== this.#seq || error.name === "AbortError") return;
      this.#fail(error);
    }
    if (seq === this.#seq) this.#schedule();
  }

  #fail(error) {
    const expired = error.status === 401;
    const detail = { status: error.status || 0, code: error.code || "", message: error.message };
    this.#data = null;
    this.#state(expired ? "expired" : "error");
    this.#status("");
    const text = expired
      ? "Your session has expired. Reload the page or sign in again to see your usage."
      : `Usage could not be loaded (${error instanceof Refused ? error.message : "the service is unreachable"}).`;
    const box = this.#root.getElementById("b");
    box.innerHTML = `<p class="e" part="error" role="alert">${esc(text)}<button type="button" part="retry">Try again</button></p>`;
    box.querySelector("button").onclick = () => this.refresh();
    this.#emit(expired ? EXPIRED : "usage-meter:error", detail);
  }

  #schedule() {
    clearTimeout(this.#timer);
    const seconds = Number(this.getAttribute("refresh"));
    if (!(seconds > 0) || !this.isConnected || this.getAttribute("state") === "expired") return;
    this.#timer = setTimeout(
      () => (document.hidden ? this.#schedule() : this.#load()),
      Math.max(seconds, REFRESH_FLOOR) * 1000,
    );
  }

  #render(usage) {
    const locale = this.closest("[lang]")?.lang || navigator.language;
    const nf = new Intl.NumberFormat(locale);
    const n = (v) => nf.format(v);
    const day = new Intl.DateTimeFormat(locale, { dateStyle: "medium", timeZone: "UTC" });
    const range = ({ start, end }) => {
      const a = new Date(start);
      const b = new Date(Math.max(Date.parse(end) - 1, a)); // the end is exclusive
      return `<time datetime="${esc(start)}">${esc(day.formatRange(a, b))}</time>`;
    };
    const top = usage.period || {};
    const meters = usage.meters || [];
    const html = meters.map((m, i) => {
      // Numbers only reach the markup below (a number field holding markup becomes NaN).
      const [q, inc, over, left, pending] = [
        m.quantity, m.included, m.billable, m.included_remaining, m.pending,
      ].map(Number);
      const scale = Math.max(q, inc) || 1;
      const used = !inc
        ? `${n(q)} used, none included`
        : over ? `${n(q)} used, ${n(inc)} included` : `${n(q)} of ${n(inc)} included`;
      const own = m.period && (m.period.start !== top.start || m.period.end !== top.end);
      const fig = (part, label, field, value, cls = "") =>
        `<div part="${part}"${cls}><dt>${label}</dt><dd data-field="${field}" data-value="${value}">${n(value)}</dd></div>`;
      return `<li part="meter" data-meter="${esc(m.meter)}"><div class="top">
<h3 part="meter-name" id="n${i}">${esc(m.meter.replace(/_/g, " "))}</h3>
<span part="used" class="m" data-quantity="${q}" data-included="${inc}">${used}</span></div>
<div part="bar" role="progressbar" aria-labelledby="n${i}" aria-valuemin="0" aria-valuemax="${scale}"
aria-valuenow="${q}" aria-valuetext="${used}${over ? `, ${n(over)} billable` : ""}">
<span part="bar-included" class="i" data-w="${(q - over) / scale}"></span><span part="bar-billable" class="b" data-w="${over / scale}"></span></div>
<dl part="figures">${fig("figure", "Remaining", "remaining", left)}${fig("figure billable", "Billable", "billable", over, ' class="x"')}${fig("figure", "Pending", "pending", pending)}</dl>
${own ? `<p part="meter-period" class="m">Period: ${range(m.period)}</p>` : ""}</li>`;
    });
    const when = new Intl.DateTimeFormat(locale, { dateStyle: "medium", timeStyle: "short" });
    const asOf = usage.as_of ? when.format(new Date(usage.as_of)) : "";
    const box = this.#root.getElementById("b");
    box.innerHTML = meters.length
      ? `<p part="period" class="m" data-source="${esc(top.source || "")}">Billing period: ${top.start ? range(top) : ""}</p>
<ul part="meters" role="list">${html.join("")}</ul><footer part="footer" class="m">
<p part="legend">Billable: beyond the included allowance. Pending: recorded, not yet reported for billing.</p>
<p part="as-of">As of <time datetime="${esc(usage.as_of)}">${esc(asOf)}</time></p></footer>`
      : `<p part="empty" class="m">No usage to show for this period.</p>`;
    for (const span of box.querySelectorAll("[data-w]")) span.style.width = `${span.dataset.w * 100}%`;
    this.#status("");
    this.#state(meters.length ? "ready" : "empty");
  }
}

if (!customElements.get("usage-meter")) customElements.define("usage-meter", UsageMeter);
