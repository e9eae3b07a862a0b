// plotly.js early: dcc.Graph loads plotly.js (4.8 MB, ~0.1 s to run) only when its first figure renders, i.e.
// after the server has answered the request for the page's content -- while the browser sat idle waiting for
// that answer. Here it is started the moment that request is sent (a page load or a click in the navigation to a
// page with figures, window.__insightGraphPages), so it runs during the wait. Until it has run, window.Plotly is
// a promise of it: dcc.Graph takes window.Plotly through Promise.resolve, so it waits for that promise instead of
// adding plotly.js a second time; plotly.js then sets window.Plotly itself. The URL (window.__insightPlotlyURL,
// dashboard/app.py) carries Dash's fingerprint: cached for a year, never revalidated; the index of a page with
// figures preloads it with the page's scripts, so that here it only has to run. Pages without figures start
// it after a few idle seconds, so the next page opened from them finds it ready.
(function () {
    var url = window.__insightPlotlyURL;
    if (!url || window.Plotly) {
        return;
    }
    var IDLE_PRELOAD_MS = 3000;
    var pages = window.__insightGraphPages ? new RegExp(window.__insightGraphPages) : null;
    var pending = null;

    function load(why) {
        if (pending || window.Plotly) {
            return;
        }
        pending = new Promise(function (resolve, reject) {
            var s = document.createElement('script');
            s.src = url;
            s.async = true;
            s.onload = function () {
                if (window.Plotly && window.Plotly !== pending) {
                    resolve(window.Plotly);
                } else {
                    reject(new Error('Insight: ' + url + ' did not define Plotly'));
                }
            };
            s.onerror = function () {
                if (window.Plotly === pending) {
                    window.Plotly = undefined;  // dcc.Graph loads it its own way next time
                }
                reject(new Error('Insight could not load plotly.js from ' + url));
            };
            document.head.appendChild(s);
        });
        pending.catch(function () {});  // reported by the dcc.Graph that waits for it
        window.__insightPlotlyLoad = why;  // what started it: 'page', 'idle'
        window.Plotly = pending;
    }

    function prefix() {
        try {
            return JSON.parse(document.getElementById('_dash-config').textContent).requests_pathname_prefix || '/';
        } catch (e) {
            return '/';
        }
    }

    var fetch0 = window.fetch;
    window.fetch = function (input, init) {
        try {
            if (!pending && !window.Plotly && pages && init && typeof init.body === 'string'
                && String(input && input.url || input).indexOf('_dash-update-component') >= 0
                && init.body.indexOf('"_pages_content"') >= 0
                && pages.test(window.location.pathname.slice(prefix().length - 1))) {
                load('page');
            }
        } catch (e) { /* never in the way of the request */ }
        return fetch0.apply(this, arguments);
    };
    window.addEventListener('load', function () {
        setTimeout(function () {
            var idle = window.requestIdleCallback || function (f) { return setTimeout(f, 0); };
            idle(function () { load('idle'); }, {timeout: 10000});
        }, IDLE_PRELOAD_MS);
    });
})();
