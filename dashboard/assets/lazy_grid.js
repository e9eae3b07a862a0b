// dash-ag-grid on demand: its 1.3 MB bundle is not in the page (dashboard/app.py takes its <script> tag out and
// leaves its URL in window.__insightLazyScripts), so pages without a table -- Overview, Timeline -- never parse
// it. This stand-in for dash_ag_grid.AgGrid loads the bundle the first time a grid is rendered (the browser has
// it cached after that: the URL is fingerprinted and served with a one-year max-age), then renders the real
// component with the same props. Until then it is marked loading, and Dash waits for it before running a
// callback that involves a grid (_dashprivate_isLazyComponentReady, Dash's own async-component hook). It is
// started earlier where it will be needed: with the page (window.__insightLazyNow, set by dashboard/app.py for
// pages with a table), on a click of a link to such a page, or after a few idle seconds on any other page.
(function () {
    var src = window.__insightLazyScripts && window.__insightLazyScripts.dash_ag_grid;
    if (!src || window.dash_ag_grid) {
        return;
    }
    var IDLE_PRELOAD_MS = 3000;
    var ready = null;
    var shim = {};
    // the grid's webpack chunk (AG Grid itself), which the bundle would request only once it has run: fetched
    // and parsed in parallel instead (its JSONP push is picked up by the bundle whichever runs first)
    var chunks = (window.__insightLazyChunks && window.__insightLazyChunks.dash_ag_grid) || [];

    function script(url) {
        return new Promise(function (resolve, reject) {
            var s = document.createElement('script');
            s.src = url;
            s.async = true;
            s.onload = function () { resolve(true); };
            s.onerror = function () { reject(new Error('Insight could not load the table component from ' + url)); };
            document.head.appendChild(s);
        });
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
        var ns = window.dash_ag_grid;
        return ns && ns !== shim && ns.AgGrid ? ns.AgGrid : null;
    }

    function AgGrid(props) {
        var React = window.React;
        var state = React.useState(0);
        var Grid = real();
        React.useEffect(function () {
            if (!Grid) {
                load().then(function () { state[1](1); });
            }
        }, []);
        if (!Grid) {
            return React.createElement('div', {className: 'insight-grid-loading', 'data-dash-is-loading': 'true',
                                               style: props.style});
        }
        return React.createElement(Grid, props);
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
