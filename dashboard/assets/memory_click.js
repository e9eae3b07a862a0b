// Memory page: a click on the timeline reports the cursor's time (ms), not the nearest point's: Plotly's
// click event names the nearest point (with hovermode "x" it may lie after the cursor), so the cursor is
// converted to data coordinates here and handed to the page's "mem-cursor" store.
(function () {
    function attach(gd) {
        if (gd._insightCursor) { return; }
        gd._insightCursor = true;
        gd.on('plotly_click', function (evt) {
            var xa = gd._fullLayout && gd._fullLayout.xaxis;
            var drag = gd.querySelector('.nsewdrag');
            if (!xa || !drag || !evt || !evt.event) { return; }
            var box = drag.getBoundingClientRect();
            var x = xa.p2l(evt.event.clientX - box.left);
            if (!isFinite(x)) { return; }
            window.dash_clientside.set_props('mem-cursor', {data: {x_ms: x, at: Date.now()}});
        });
    }
    setInterval(function () {
        var gd = document.querySelector('#mem-timeline .js-plotly-plot');
        if (gd && gd.on) { attach(gd); }
    }, 300);
})();
