// dash-ag-grid on demand: its 1.3 MB bundle is not in the page (dashboard/app.py takes its <script> tag out and
// leaves its URL in window.__insightLazyScripts), so pages without a table -- Overview, Timeline -- never parse
// it. This stand-in for dash_ag_grid.AgGrid loads the bundle the first time a grid is rendered (the browser has
// it cached after that: the URL is fingerprinted and served with a one-year max-age), then renders the real
// component with the same props. Until then it is marked loading, and Dash waits for it before running a
// callback that involves a grid (_dashprivate_isLazyComponentReady, Dash's own async-component hook). It is
// started earlier where it will be needed: with the page (window.__insightLazyNow, set by dashboard/app.py for
// pages with a table), on a click of a link to such a page, or after a few idle seconds on any other page.
// On a page with figures the stand-in also holds each grid back until the figures are drawn (see AgGrid below).
(function () {
    var src = window.__insightLazyScripts && window.__insightLazyScripts.dash_ag_grid;
    if (!src || window.dash_ag_grid) {
        return;
    }
    var IDLE_PRELOAD_MS = 3000;
    var ready = null;
    var shim = {};
    var loaded = null;  // the bundle's own namespace, once it has run
    // the grid's webpack chunk (AG Grid itself), which the bundle would request only once it has run: fetched
    // and parsed in parallel instead (its JSONP push is picked up by the bundle whichever runs first)
    var chunks = (window.__insightLazyChunks && window.__insightLazyChunks.dash_ag_grid) || [];

    function script(url) {
        return new Promise(function (resolve, reject) {
            var s = document.createElement('script');
            s.src = url;
            s.async = true;
            s.onload = function () { adopt(); resolve(true); };
            s.onerror = function () { reject(new Error('Insight could not load the table component from ' + url)); };
            document.head.appendChild(s);
        });
    }

    // the bundle puts its namespace in window.dash_ag_grid: the shim is put back, so that every grid, also those
    // of later pages, goes through it (and is deferred while figures are drawn), with the namespace's other
    // members (getApi, getApiAsync, ...) copied onto it
    function adopt() {
        var ns = window.dash_ag_grid;
        if (ns && ns !== shim) {
            loaded = ns;
            Object.keys(ns).forEach(function (k) {
                if (k !== 'AgGrid') { shim[k] = ns[k]; }
            });
            window.dash_ag_grid = shim;
        }
    }

    function load(why) {
        if (!ready) {
            window.__insightGridLoad = why || 'render';  // what loaded it: 'page', 'nav', 'idle', 'render'
            ready = Promise.all([src].concat(chunks).map(script)).then(function () { return true; }, function (e) {
                ready = null;
                throw e;
            });
        }
        return ready;
    }

    function real() {
        return loaded && loaded.AgGrid ? loaded.AgGrid : null;
    }

    // On a page with figures a grid is rendered once they are drawn (at the next idle moment after that, or after
    // SETTLE_MAX_MS): AG Grid's first render forces layouts and style reads (~0.1 s a grid here) that would
    // otherwise hold back the figures, which are what the user looks at first (every table of the run pages is
    // below them). Until then it is a placeholder of about its height, so that nothing jumps when it appears.
    var SETTLE_MAX_MS = 3000;
    var idle = window.requestIdleCallback || function (f) { return setTimeout(f, 16); };

    function figuresDrawn() {
        var gs = document.querySelectorAll('.dash-graph');
        for (var i = 0; i < gs.length; i++) {
            var g = gs[i];
            // (offsetParent forces a layout: asked only of a graph not drawn, whether it is hidden)
            if ((g.classList.contains('dash-graph--pending') || !g.querySelector('.main-svg')) && g.offsetParent !== null) {
                return false;
            }
        }
        return true;
    }

    // every grid waiting is shown in the same task, so that React renders them together
    var waiting = [];
    var t0 = 0;

    function settle() {
        if (figuresDrawn() || Date.now() - t0 > SETTLE_MAX_MS) {
            var shows = waiting;
            waiting = [];
            shows.forEach(function (show) { show(); });
        } else {
            idle(settle, {timeout: 250});
        }
    }

    function whenSettled(show) {
        waiting.push(show);
        if (waiting.length === 1) {
            t0 = Date.now();
            idle(settle, {timeout: 250});
        }
    }

    // the drawn grid's height in the dashboard's style (insight.css): header and floating filters 138 px, rows of
    // 39 px, the pagination bar 48 px (measured: 576 px for 10 rows, 771 px for 15)
    function placeholderHeight(props) {
        var o = props.dashGridOptions || {};
        var n = (props.rowData || []).length;
        var rows = o.pagination && o.paginationPageSize ? Math.min(n, o.paginationPageSize) : n;
        return 138 + rows * 39 + (o.pagination ? 48 : 0);
    }

    function AgGrid(props) {
        var React = window.React;
        var state = React.useState(0);
        var shown = React.useRef(false);
        var Grid = real();
        // a layout effect: a grid on a page without figures is rendered before the browser paints the placeholder
        React.useLayoutEffect(function () {
            var alive = true;
            function show() {
                if (alive && !shown.current) {
                    shown.current = true;
                    state[1](function (k) { return k + 1; });
                }
            }
            if (!Grid) {
                load().then(function () { if (alive) { state[1](function (k) { return k + 1; }); } });
            }
            if (document.querySelector('.dash-graph')) {
                whenSettled(show);
            } else {
                show();
            }
            return function () { alive = false; };
        }, []);
        if (Grid && shown.current) {
            return React.createElement(Grid, props);
        }
        var style = Object.assign({}, props.style || {}, {minHeight: placeholderHeight(props)});
        var attrs = {className: 'insight-grid-loading', style: style};
        if (!Grid) {
            attrs['data-dash-is-loading'] = 'true';  // Dash waits for the bundle (not for a deferred render)
        }
        return React.createElement('div', attrs);
    }
    AgGrid.dashRenderType = true;  // as the real AgGrid: the renderer passes dashRenderType through
    Object.defineProperty(AgGrid, '_dashprivate_isLazyComponentReady', {get: function () { return load('render'); }});
    shim.AgGrid = AgGrid;
    window.dash_ag_grid = shim;
    // a click on a link to a page with a table starts the bundle while that page's layout is fetched
    var gridPages = window.__insightGridPages ? new RegExp(window.__insightGridPages) : null;
    document.addEventListener('click', function (e) {
        var a = e.target && e.target.closest ? e.target.closest('a[href]') : null;
        if (a && gridPages && a.origin === window.location.origin && gridPages.test(a.pathname)) {
            load('nav').catch(function () {});
        }
    }, true);
    if (window.__insightLazyNow) {
        load('page');  // a page with a table was requested: its bundle is parsed while the layout is fetched
    } else {
        // a page without one: the bundle is run once the page has been idle a while, so that the next page
        // opened from the navigation does not wait ~0.5 s for it (a click within the first seconds still does)
        window.addEventListener('load', function () {
            setTimeout(function () {
                var idle = window.requestIdleCallback || function (f) { return setTimeout(f, 0); };
                idle(function () { load('idle').catch(function () {}); }, {timeout: 10000});
            }, IDLE_PRELOAD_MS);
        });
    }
})();
