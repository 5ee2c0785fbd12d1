/*
 * Rolling-window statistics of sensor values: the one formula both feature engines use
 * (turbofan_core/features.py, `_window_statistics`).
 *
 * Why C: the edge computes every window of every device on every message (three windows of up
 * to 120 values for 14 sensors), and in numpy each statistic is several passes over the window
 * and a temporary as large as it; here a pass per sum it needs, over a window in cache, without
 * temporaries and without the GIL.
 *
 * The formula: of a row's last `w` slots, the last count[r] are valid (count between 1 and w); the
 * mean is their sum divided by n = count[r]; std (population) and slope (least squares against
 * the position) are computed on values centred on that mean, which stays accurate for sensors
 * near 9000 with a spread of a few units (E[x^2] - E[x]^2 would not); the slope of one value is 0.
 * Sums run over the slots in order, so both engines get the same bits from the same values.
 *
 * The caller checks the arrays' shapes and types; here each buffer's size and each count is checked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

enum { MEAN, STD, SLOPE, MIN, MAX, N_STATISTICS }; /* the codes, in STATISTICS order */
enum { WINDOW, ROWS, START, COUNT, CODES, OUT, N_BUFFERS };

static int size_is(Py_buffer *buffer, Py_ssize_t items, Py_ssize_t item_size, const char *name) {
    if (buffer->len == items * item_size) return 0;
    PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, buffer->len, items * item_size);
    return -1;
}

/* Slot k of a ring of `span` slots whose slots in time order begin at `first` (both below span). */
#define SLOT(k) (x + ((first + (k)) < span ? first + (k) : first + (k) - span) * sensors)

/* One row: `x` its ring (span x sensors), whose last w slots in time order begin at slot `first`;
 * `sums` scratch of 5 x sensors, `out` strided by `plane`. Only the sums the statistics need, each
 * in a loop of its own that the compiler can vectorise; the window is read again from cache for each. */
static void row_statistics(const double *restrict x, Py_ssize_t span, Py_ssize_t first, Py_ssize_t w,
                           Py_ssize_t sensors, int64_t count, const int *wanted, const unsigned char *codes,
                           Py_ssize_t n_codes, double *restrict sums, double *restrict out, Py_ssize_t plane) {
    double *restrict mean = sums, *restrict square = sums + sensors, *restrict moment = sums + 2 * sensors,
                     *restrict low = sums + 3 * sensors, *restrict high = sums + 4 * sensors;
    const double n = (double)count;
    const Py_ssize_t valid = w - (Py_ssize_t)count; /* the first valid slot of the window */
    for (Py_ssize_t s = 0; s < sensors; s++) {
        mean[s] = square[s] = moment[s] = 0.0;
        low[s] = INFINITY;
        high[s] = -INFINITY;
    }
    for (Py_ssize_t k = valid; k < w; k++) {
        const double *restrict value = SLOT(k);
        for (Py_ssize_t s = 0; s < sensors; s++) mean[s] += value[s];
    }
    for (Py_ssize_t s = 0; s < sensors; s++) mean[s] /= n;
    if (wanted[STD])
        for (Py_ssize_t k = valid; k < w; k++) {
            const double *restrict value = SLOT(k);
            for (Py_ssize_t s = 0; s < sensors; s++) {
                const double centred = value[s] - mean[s];
                square[s] += centred * centred;
            }
        }
    if (wanted[SLOPE])
        for (Py_ssize_t k = valid; k < w; k++) {
            const double *restrict value = SLOT(k);
            /* Position in the window minus the mean position of the last n slots. */
            const double position = (double)(k - (w - 1)) + (n - 1.0) / 2.0;
            for (Py_ssize_t s = 0; s < sensors; s++) moment[s] += position * (value[s] - mean[s]);
        }
    if (wanted[MIN] || wanted[MAX])
        for (Py_ssize_t k = valid; k < w; k++) {
            const double *restrict value = SLOT(k);
            for (Py_ssize_t s = 0; s < sensors; s++) {
                low[s] = value[s] < low[s] ? value[s] : low[s];
                high[s] = value[s] > high[s] ? value[s] : high[s];
            }
        }
    const double sxx = n * (n * n - 1.0) / 12.0; /* sum of squared centred positions 0..n-1 */
    for (Py_ssize_t c = 0; c < n_codes; c++) {
        double *o = out + c * plane;
        for (Py_ssize_t s = 0; s < sensors; s++) {
            switch (codes[c]) {
            case MEAN: o[s] = mean[s]; break;
            case STD: o[s] = sqrt(square[s] / n); break;
            case SLOPE: o[s] = sxx > 0.0 ? moment[s] / sxx : 0.0; break;
            case MIN: o[s] = low[s]; break;
            default: o[s] = high[s]; break;
            }
        }
    }
}

static PyObject *statistics(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer b[N_BUFFERS] = {{0}};
    Py_ssize_t rings, span, sensors, w;
    PyObject *result = NULL;
    double *sums = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnny*y*y*y*w*", &b[WINDOW], &rings, &span, &sensors, &w, &b[ROWS], &b[START],
                          &b[COUNT], &b[CODES], &b[OUT]))
        return NULL;
    const Py_ssize_t n_codes = b[CODES].len, rows = b[ROWS].len / 8;
    if (rings < 0 || sensors < 1 || w < 1 || span < w) {
        PyErr_SetString(PyExc_ValueError, "rings, span, sensors or w out of range");
        goto done;
    }
    if (size_is(&b[WINDOW], rings * span * sensors, 8, "window") < 0 || size_is(&b[ROWS], rows, 8, "rows") < 0 ||
        size_is(&b[START], rows, 8, "start") < 0 || size_is(&b[COUNT], rows, 8, "count") < 0 ||
        size_is(&b[OUT], n_codes * rows * sensors, 8, "out") < 0)
        goto done;
    const unsigned char *codes = b[CODES].buf;
    int wanted[N_STATISTICS] = {0};
    for (Py_ssize_t c = 0; c < n_codes; c++) {
        if (codes[c] >= N_STATISTICS) {
            PyErr_Format(PyExc_ValueError, "unknown statistic code %d", codes[c]);
            goto done;
        }
        wanted[codes[c]] = 1;
    }
    const int64_t *ring = b[ROWS].buf, *start = b[START].buf, *count = b[COUNT].buf;
    for (Py_ssize_t r = 0; r < rows; r++) {
        if (ring[r] < 0 || ring[r] >= rings || start[r] < 0 || start[r] >= span || count[r] < 1 || count[r] > w) {
            PyErr_Format(PyExc_ValueError, "row %zd: ring, start or count out of range", r);
            goto done;
        }
    }
    sums = PyMem_Malloc(5 * sensors * sizeof(double));
    if (sums == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const double *window = b[WINDOW].buf;
        double *out = b[OUT].buf;
        Py_BEGIN_ALLOW_THREADS;
        for (Py_ssize_t r = 0; r < rows; r++)
            row_statistics(window + ring[r] * span * sensors, span, (start[r] + span - w) % span, w, sensors,
                           count[r], wanted, codes, n_codes, sums, out + r * sensors, rows * sensors);
        Py_END_ALLOW_THREADS;
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(sums);
    for (int i = 0; i < N_BUFFERS; i++)
        if (b[i].obj != NULL) PyBuffer_Release(&b[i]);
    return result;
}

static PyMethodDef methods[] = {
    {"statistics", statistics, METH_VARARGS,
     "statistics(window, rings, span, sensors, w, rows, start, count, codes, out) -> None\n\n"
     "Writes the statistics `codes` names (bytes: 0 mean, 1 std, 2 slope, 3 min, 4 max) of the last `w` "
     "slots of each ring `rows` names into `out` (float64, codes x rows x sensors). `window` is float64, "
     "rings x span x sensors: rings of span slots, whose slots in time order begin at `start` (int64, "
     "one per row, as `rows` and `count`); `count`: how many of the w slots are valid, the last ones."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_windows",
    .m_doc = "Rolling-window statistics of sensor values.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__windows(void) { return PyModule_Create(&module); }
