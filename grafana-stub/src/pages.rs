//! The two HTML pages a real browser needs to sign in and stay signed in:
//! the login form and a frontend-like app page whose script does what
//! Grafana's frontend does with a session over time. They are small
//! imitations, not Grafana's bundle; what they imitate is named next to
//! each behaviour.
//!
//! The app page keeps counters in `window.__stub` (and in `#stub-status`)
//! so that a test driving a browser can read what happened:
//!
//! - `ok`: `GET {sub}/api/user` answered 200 (first try or retried);
//! - `rotations`: `POST {sub}/api/user/auth-tokens/rotate` answered 200;
//! - `renewals`: those of them that brought a new session — seen as a new
//!   `grafana_session_expiry` cookie (the session cookie itself is
//!   HttpOnly); a rotation Grafana skipped (`SkipRotationTime`) is not one;
//! - `failures`: a poll that ended without a 200, and every logout;
//! - `unauthorized`: 401 answers to the polls;
//! - `rotateHints`: those of them whose JSON `messageId` is
//!   `session.token.rotate` (Grafana's own body reached the browser);
//! - `statuses`: every status seen, in order (the last 50); `lastError`.

/// Escapes a value for a JavaScript string literal inside a `<script>`.
fn js_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `GET {sub}/login`: a form whose script posts `{"user","password"}` as
/// JSON to `{sub}/login` (same-origin credentials) and, on 200, goes where
/// the `redirectTo` parameter says. Grafana's login page keeps `redirectTo`
/// in session storage and, once signed in, the app routes to it under
/// `appSubUrl` (`handleRedirectTo` with useSessionStorageForRedirection);
/// the end result — the page asked for, under the sub path — is the same.
/// A value that is not a local path (one leading `/`) goes to `{sub}/`.
pub fn login_page(sub_path: &str) -> String {
    LOGIN_PAGE.replace("__APP_SUB_URL__", &js_string(sub_path))
}

/// A signed-in Grafana page (`{sub}/`, `{sub}/d/…`). Its script polls
/// `GET {sub}/api/user` every 250 ms, sending `X-Grafana-Org-Id` as
/// Grafana's `backend_srv.ts` does for local URLs, and handles a 401 as
/// `backend_srv.ts`'s `handleStreamError` does (Grafana 10.3+, client token
/// rotation): on the first attempt of a request, *any* 401 makes it call
/// `POST {sub}/api/user/auth-tokens/rotate` (one call shared by concurrent
/// requests, `rotateToken`) and retry the request once when that succeeds;
/// a 401 from the rotation logs the user out (`contextSrv.setLoggedOut`,
/// which reloads the page so that the server redirects to the login page —
/// here the script goes to `{sub}/login?redirectTo=…` itself). Grafana's
/// frontend does not look at the 401's `messageId`; the page records it
/// (`rotateHints`) so a test can check that Grafana's own answer got
/// through.
///
/// Left out: `context_srv.ts` also rotates ahead of time, 1–19 s before the
/// `grafana_session_expiry` cookie's time. That job hides the path above —
/// the one where a proxy meets Grafana's `session.token.rotate` — and with
/// the intervals of seconds tests use it would spin against Grafana's
/// five-second `SkipRotationTime`.
pub fn app_page(sub_path: &str, org_id: i64, login: &str) -> String {
    APP_PAGE
        .replace("__APP_SUB_URL__", &js_string(sub_path))
        .replace("__ORG_ID__", &org_id.to_string())
        .replace("__LOGIN__", &js_string(login))
}

const LOGIN_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Grafana</title></head>
<body>
<h1>Welcome to Grafana</h1>
<form id="login-form">
  <label>Email or username <input id="user" name="user" autocomplete="username"></label>
  <label>Password <input id="password" name="password" type="password" autocomplete="current-password"></label>
  <button id="login-submit" type="submit">Log in</button>
</form>
<p id="login-error"></p>
<script>
(function () {
  const APP_SUB_URL = __APP_SUB_URL__;
  function destination() {
    const to = new URLSearchParams(window.location.search).get("redirectTo");
    if (to && to.startsWith("/") && !to.startsWith("//") && !to.startsWith("/\\")) {
      if (APP_SUB_URL !== "" && (to === APP_SUB_URL || to.startsWith(APP_SUB_URL + "/"))) {
        return to;
      }
      return APP_SUB_URL + to;
    }
    return APP_SUB_URL + "/";
  }
  document.getElementById("login-form").addEventListener("submit", async function (event) {
    event.preventDefault();
    const error = document.getElementById("login-error");
    error.textContent = "";
    try {
      const response = await fetch(APP_SUB_URL + "/login", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          user: document.getElementById("user").value,
          password: document.getElementById("password").value,
        }),
      });
      if (response.status === 200) {
        window.location.assign(destination());
        return;
      }
      let message = "Login failed";
      try { message = (await response.json()).message || message; } catch (e) {}
      error.textContent = response.status + " " + message;
    } catch (e) {
      error.textContent = String(e);
    }
  });
})();
</script>
</body>
</html>
"#;

const APP_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Grafana</title></head>
<body>
<h1>Dashboard</h1>
<p>Signed in as <span id="stub-login"></span></p>
<pre id="stub-status">ok=0 rotations=0 failures=0</pre>
<script>
(function () {
  const APP_SUB_URL = __APP_SUB_URL__;
  const ORG_ID = __ORG_ID__;
  const POLL_MS = 250;
  document.getElementById("stub-login").textContent = __LOGIN__;
  const stub = {
    ok: 0, rotations: 0, renewals: 0, failures: 0, unauthorized: 0, rotateHints: 0,
    loggedOut: false, lastError: "", statuses: [],
  };
  window.__stub = stub;

  function show() {
    const line = "ok=" + stub.ok + " rotations=" + stub.rotations + " failures=" + stub.failures;
    const el = document.getElementById("stub-status");
    el.textContent = line;
    el.dataset.ok = stub.ok;
    el.dataset.rotations = stub.rotations;
    el.dataset.failures = stub.failures;
  }
  function expiryCookie() {
    const found = document.cookie.split("; ").find(function (c) {
      return c.startsWith("grafana_session_expiry=");
    });
    return found ? found.substring("grafana_session_expiry=".length) : "";
  }
  function note(status) {
    stub.statuses.push(status);
    if (stub.statuses.length > 50) stub.statuses.shift();
  }

  // backend_srv.ts: local requests carry the user's org.
  async function request(method, path) {
    const response = await fetch(APP_SUB_URL + path, {
      method: method,
      credentials: "same-origin",
      headers: { "X-Grafana-Org-Id": String(ORG_ID), "Accept": "application/json" },
    });
    const text = await response.text();
    let data = null;
    try { data = JSON.parse(text); } catch (e) { data = text; }
    return { status: response.status, data: data };
  }

  // rotateToken(): one rotation shared by whoever needs it meanwhile.
  let rotationInProgress = null;
  function rotateToken() {
    if (!rotationInProgress) {
      rotationInProgress = request("POST", "/api/user/auth-tokens/rotate").finally(function () {
        rotationInProgress = null;
      });
    }
    return rotationInProgress;
  }

  // contextSrv.setLoggedOut(): the page goes back to the login page.
  function logout() {
    if (stub.loggedOut) return;
    stub.loggedOut = true;
    stub.failures += 1;
    show();
    let here = window.location.pathname + window.location.search;
    if (APP_SUB_URL !== "" && here.startsWith(APP_SUB_URL)) here = here.substring(APP_SUB_URL.length);
    window.location.assign(APP_SUB_URL + "/login?redirectTo=" + encodeURIComponent(here));
  }

  function fail(what, answer) {
    stub.failures += 1;
    stub.lastError = what + ": " + answer.status + " " + JSON.stringify(answer.data);
  }

  async function poll() {
    let answer = await request("GET", "/api/user");
    note(answer.status);
    if (answer.status === 200) {
      stub.ok += 1;
      return;
    }
    if (answer.status !== 401) {
      fail("GET /api/user", answer);
      return;
    }
    // handleStreamError: a 401 on the first attempt -> rotate, then retry once.
    stub.unauthorized += 1;
    if (answer.data && answer.data.messageId === "session.token.rotate") stub.rotateHints += 1;
    const expiryBefore = expiryCookie();
    const rotated = await rotateToken();
    note("rotate:" + rotated.status);
    if (rotated.status === 401) {
      stub.lastError = "rotate: 401 " + JSON.stringify(rotated.data);
      logout();
      return;
    }
    if (rotated.status !== 200) {
      fail("POST rotate", rotated);
      return;
    }
    stub.rotations += 1;
    if (expiryCookie() !== expiryBefore) stub.renewals += 1;
    answer = await request("GET", "/api/user");
    note(answer.status);
    if (answer.status === 200) {
      stub.ok += 1;
    } else {
      fail("GET /api/user after rotation", answer);
    }
  }

  async function loop() {
    while (!stub.loggedOut) {
      try {
        await poll();
      } catch (e) {
        stub.failures += 1;
        stub.lastError = String(e);
      }
      show();
      if (stub.loggedOut) return;
      await new Promise(function (resolve) { setTimeout(resolve, POLL_MS); });
    }
  }
  show();
  loop();
})();
</script>
</body>
</html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_safe_in_scripts() {
        assert_eq!(js_string("/graph"), r#""/graph""#);
        assert_eq!(js_string("</script>\"x"), r#""\u003c/script\u003e\"x""#);
        let page = app_page("/graph", 2, "a\"b");
        assert!(page.contains(r#"const APP_SUB_URL = "/graph";"#));
        assert!(page.contains("const ORG_ID = 2;"));
        for placeholder in ["__APP_SUB_URL__", "__ORG_ID__", "__LOGIN__"] {
            assert!(!page.contains(placeholder), "{placeholder}");
        }
        assert!(!login_page("").contains("__APP_SUB_URL__"));
    }
}
