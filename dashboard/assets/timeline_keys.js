// Timeline keyboard navigation, as in Perfetto: W / S zoom in / out around the centre of the view, A / D pan
// by a fifth of it. Plotly.relayout changes the x axis exactly as a drag or scroll does, so the server sends
// the new window through the page's usual relayoutData callback. Keys typed into inputs are left alone.
(function () {
    var ZOOM = 0.75, PAN = 0.2;
    document.addEventListener('keydown', function (ev) {
        if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
        var t = ev.target;
        if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) { return; }
        var key = (ev.key || '').toLowerCase();
        if (key !== 'w' && key !== 'a' && key !== 's' && key !== 'd') { return; }
        var host = document.getElementById('tl-graph');
        var gd = host && (host.classList.contains('js-plotly-plot') ? host : host.querySelector('.js-plotly-plot'));
        if (!gd || !window.Plotly || typeof window.Plotly.relayout !== 'function' || !gd._fullLayout
            || !gd._fullLayout.xaxis) { return; }
        var r = gd._fullLayout.xaxis.range.map(Number);
        var span = r[1] - r[0], mid = (r[0] + r[1]) / 2, next;
        if (!(span > 0)) { return; }
        if (key === 'w') { next = [mid - span * ZOOM / 2, mid + span * ZOOM / 2]; }
        else if (key === 's') { next = [mid - span / ZOOM / 2, mid + span / ZOOM / 2]; }
        else if (key === 'a') { next = [r[0] - span * PAN, r[1] - span * PAN]; }
        else { next = [r[0] + span * PAN, r[1] + span * PAN]; }
        ev.preventDefault();
        window.Plotly.relayout(gd, {'xaxis.range': next});
    });
})();
