// The row count beside a grid (``#<grid id>-count``, dashboard/components.py: grid_tools) follows the grid's
// filters and searches: AG Grid's modelUpdated event (data_grid's eventListeners) sets it in the browser.
// A Dash callback on the grid's virtualRowData did the same, but every grid sets that prop when it is drawn, and
// the callback it started (the whole filtered row data through Dash's callback pipeline) took 0.1-0.4 s of an
// Operators page's render in Chrome.
window.dashAgGridFunctions = window.dashAgGridFunctions || {};
window.dashAgGridFunctions.insightRowCount = function (params, id) {
    var el = document.getElementById(id + '-count');
    if (!el || !params || !params.api) {
        return;
    }
    var text = params.api.getDisplayedRowCount() + ' rows';
    var node = el.firstChild;
    if (node && node.nodeType === 3 && !node.nextSibling) {
        if (node.nodeValue !== text) {
            node.nodeValue = text;  // the text node React rendered, changed in place (React keeps its reference)
        }
    } else {
        el.textContent = text;
    }
};
