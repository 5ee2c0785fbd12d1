/*
 * Rolling-window statistics of sensor values: the one formula both feature engines use
 * (turbofan_core/features.py, `_window_statistics`), and the streaming engine's update
 * (`StreamingFeatures.update_many`), which applies it to each device's ring.
 *
 * Why C: the edge computes every window of every device on every message (three windows of up
 * to 120 values for 14 sensors), and in numpy each statistic is several passes over the window
 * and a temporary as large as it; here a pass per sum it needs, over a window in cache, without
 * temporaries and without the GIL. And the edge scores single messages: moving a device's state
 * (ring, smoothed values, cycle, count) and assembling its feature row took about 30 numpy calls,
 * some 40 us of per-call overhead for a few hundred floating-point operations; `update` does it
 * in one call (without the GIL from GIL_FREE_ROWS devices).
 *
 * The formula: of a row's last `w` slots, the last count[r] are valid (count between 1 and w); the
 * mean is their sum divided by n = count[r]; std (population) and slope (least squares against
 * the position) are computed on values centred on that mean, which stays accurate for sensors
 * near 9000 with a spread of a few units (E[x^2] - E[x]^2 would not); the slope of one value is 0.
 * Sums run over the slots in order, so both engines get the same bits from the same values.
 *
 * The caller checks the arrays' shapes and types; here each buffer's size and each count, index
 * and column is checked, and `update`'s buffers must not overlap (it writes some while it reads
 * indices from others).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { MEAN, STD, SLOPE, MIN, MAX, N_STATISTICS }; /* the codes, in STATISTICS order */
enum { WINDOW, COUNT, CODES, OUT, N_BUFFERS };

/* 0 when `buffer` holds a x b x c items of 8 bytes; else -1, ValueError set. The product is built
 * only while it stays within the buffer's size, so sizes too large for a Py_ssize_t cannot wrap round. */
static int shape_is(Py_buffer *buffer, Py_ssize_t a, Py_ssize_t b, Py_ssize_t c, const char *name) {
    const Py_ssize_t factors[3] = {a, b, c};
    Py_ssize_t bytes = 8;
    int fits = a >= 0 && b >= 0 && c >= 0;
    if (fits && a != 0 && b != 0 && c != 0)
        for (int i = 0; i < 3 && fits; i++) {
            fits = factors[i] <= buffer->len / bytes;
            bytes *= fits ? factors[i] : 1;
        }
    else
        bytes = 0;
    if (fits && buffer->len == bytes) return 0;
    PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd x %zd x %zd items of 8 bytes", name,
                 buffer->len, a, b, c);
    return -1;
}

/* Marks in `wanted` the statistics `codes` names; -1 (ValueError set) on an unknown code. */
static int read_codes(const unsigned char *codes, Py_ssize_t n_codes, int wanted[N_STATISTICS]) {
    for (Py_ssize_t c = 0; c < n_codes; c++) {
        if (codes[c] >= N_STATISTICS) {
            PyErr_Format(PyExc_ValueError, "unknown statistic code %d", codes[c]);
            return -1;
        }
        wanted[codes[c]] = 1;
    }
    return 0;
}

/* 0 when each of the `items` int64 of `buffer` lies in [low, high); else -1, ValueError set. */
static int indices_in(Py_buffer *buffer, Py_ssize_t items, int64_t low, int64_t high, const char *name) {
    const int64_t *index = buffer->buf;
    for (Py_ssize_t i = 0; i < items; i++)
        if (index[i] < low || index[i] >= high) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] = %lld out of range [%lld, %lld)", name, i, (long long)index[i],
                         (long long)low, (long long)high);
            return -1;
        }
    return 0;
}

/* 0 when no two of the `n` buffers share a byte; else -1, ValueError set. The update reads indices
 * from some buffers while it writes others: checked indices must not change under it. */
static int disjoint(const Py_buffer *buffers, const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++) {
            const char *a = buffers[i].buf, *b = buffers[j].buf;
            if (buffers[i].len > 0 && buffers[j].len > 0 && a < b + buffers[j].len && b < a + buffers[i].len) {
                PyErr_Format(PyExc_ValueError, "%s and %s share memory", names[i], names[j]);
                return -1;
            }
        }
    return 0;
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
    Py_ssize_t windows, span, sensors, w;
    PyObject *result = NULL;
    double *sums = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnny*y*w*", &b[WINDOW], &windows, &span, &sensors, &w, &b[COUNT], &b[CODES],
                          &b[OUT]))
        return NULL;
    const Py_ssize_t n_codes = b[CODES].len;
    if (windows < 0 || sensors < 1 || w < 1 || span < w) {
        PyErr_SetString(PyExc_ValueError, "windows, span, sensors or w out of range");
        goto done;
    }
    if (shape_is(&b[WINDOW], windows, span, sensors, "window") < 0 ||
        shape_is(&b[COUNT], windows, 1, 1, "count") < 0 || shape_is(&b[OUT], n_codes, windows, sensors, "out") < 0)
        goto done;
    const unsigned char *codes = b[CODES].buf;
    int wanted[N_STATISTICS] = {0};
    if (read_codes(codes, n_codes, wanted) < 0) goto done;
    const int64_t *count = b[COUNT].buf;
    for (Py_ssize_t r = 0; r < windows; r++) {
        if (count[r] < 1 || count[r] > w) {
            PyErr_Format(PyExc_ValueError, "window %zd: count out of range", r);
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
        for (Py_ssize_t r = 0; r < windows; r++) /* the last w of its span slots, in order */
            row_statistics(window + r * span * sensors, span, span - w, w, sensors, count[r], wanted, codes, n_codes,
                           sums, out + r * sensors, windows * sensors);
        Py_END_ALLOW_THREADS;
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(sums);
    for (int i = 0; i < N_BUFFERS; i++)
        if (b[i].obj != NULL) PyBuffer_Release(&b[i]);
    return result;
}

enum { GIL_FREE_ROWS = 64 }; /* from this many rows `update` runs without the interpreter */

enum {
    U_HISTORY, U_START, U_COUNT, U_CYCLE, U_SMOOTHED, U_ALPHAS, U_ROWS, U_CYCLES, U_VALUES, U_WINDOWS, U_CODES,
    U_RAW, U_STATS, U_EWM, U_OUT, N_UPDATE_BUFFERS
};

static PyObject *update(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer b[N_UPDATE_BUFFERS] = {{0}};
    Py_ssize_t span, sensors, features, cycle_column;
    PyObject *result = NULL;
    double *sums = NULL;
    if (!PyArg_ParseTuple(args, "w*nnw*w*w*w*y*y*y*y*y*y*nny*y*y*w*", &b[U_HISTORY], &span, &sensors, &b[U_START],
                          &b[U_COUNT], &b[U_CYCLE], &b[U_SMOOTHED], &b[U_ALPHAS], &b[U_ROWS], &b[U_CYCLES],
                          &b[U_VALUES], &b[U_WINDOWS], &b[U_CODES], &features, &cycle_column, &b[U_RAW],
                          &b[U_STATS], &b[U_EWM], &b[U_OUT]))
        return NULL;
    const Py_ssize_t devices = b[U_COUNT].len / 8, alphas = b[U_ALPHAS].len / 8, rows = b[U_ROWS].len / 8,
                     windows = b[U_WINDOWS].len / 8, n_codes = b[U_CODES].len;
    /* A span beyond any buffer is refused here, so that span + 1 (the windows' bound) cannot overflow. */
    if (span < 1 || span > PY_SSIZE_T_MAX / 8 || sensors < 1 || features < 0 || cycle_column < -1 ||
        cycle_column >= features) {
        PyErr_SetString(PyExc_ValueError, "span, sensors, features or cycle_column out of range");
        goto done;
    }
    static const char *const names[N_UPDATE_BUFFERS] = {
        "history", "start", "count", "cycle", "smoothed", "alphas", "rows", "cycles", "values", "windows", "codes",
        "raw_columns", "stats_columns", "ewm_columns", "out"};
    if (disjoint(b, names, N_UPDATE_BUFFERS) < 0) goto done;
    if (shape_is(&b[U_HISTORY], devices, span, sensors, "history") < 0 ||
        shape_is(&b[U_START], devices, 1, 1, "start") < 0 || shape_is(&b[U_COUNT], devices, 1, 1, "count") < 0 ||
        shape_is(&b[U_CYCLE], devices, 1, 1, "cycle") < 0 ||
        shape_is(&b[U_SMOOTHED], devices, alphas, sensors, "smoothed") < 0 ||
        shape_is(&b[U_ALPHAS], alphas, 1, 1, "alphas") < 0 || shape_is(&b[U_ROWS], rows, 1, 1, "rows") < 0 ||
        shape_is(&b[U_CYCLES], rows, 1, 1, "cycles") < 0 || shape_is(&b[U_VALUES], rows, sensors, 1, "values") < 0 ||
        shape_is(&b[U_WINDOWS], windows, 1, 1, "windows") < 0 ||
        shape_is(&b[U_RAW], sensors, 1, 1, "raw_columns") < 0 ||
        shape_is(&b[U_STATS], n_codes, windows, sensors, "stats_columns") < 0 ||
        shape_is(&b[U_EWM], alphas, sensors, 1, "ewm_columns") < 0 ||
        shape_is(&b[U_OUT], rows, features, 1, "out") < 0)
        goto done;
    const unsigned char *codes = b[U_CODES].buf;
    int wanted[N_STATISTICS] = {0};
    if (read_codes(codes, n_codes, wanted) < 0 || indices_in(&b[U_WINDOWS], windows, 1, span + 1, "windows") < 0 ||
        indices_in(&b[U_ROWS], rows, 0, devices, "rows") < 0 ||
        indices_in(&b[U_RAW], sensors, 0, features, "raw_columns") < 0 ||
        indices_in(&b[U_STATS], n_codes * windows * sensors, 0, features, "stats_columns") < 0 ||
        indices_in(&b[U_EWM], alphas * sensors, 0, features, "ewm_columns") < 0)
        goto done;
    int64_t *start = b[U_START].buf, *count = b[U_COUNT].buf, *cycle = b[U_CYCLE].buf;
    const int64_t *row = b[U_ROWS].buf;
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (start[row[i]] < 0 || start[row[i]] >= span || count[row[i]] < 0 || count[row[i]] == INT64_MAX) {
            PyErr_Format(PyExc_ValueError, "row %zd: start or count out of range", i);
            goto done;
        }
    }
    sums = PyMem_Malloc((5 + n_codes) * sensors * sizeof(double)); /* row_statistics' sums, then its out */
    if (sums == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    {
        double *history = b[U_HISTORY].buf, *smoothed = b[U_SMOOTHED].buf, *out = b[U_OUT].buf,
               *stats = sums + 5 * sensors;
        const double *alpha = b[U_ALPHAS].buf, *values = b[U_VALUES].buf;
        const int64_t *cycles = b[U_CYCLES].buf, *window = b[U_WINDOWS].buf, *raw_columns = b[U_RAW].buf,
                      *stats_columns = b[U_STATS].buf, *ewm_columns = b[U_EWM].buf;
        /* A round of a few devices takes a few µs: letting go of the interpreter for it would only
         * invite another thread to take it, and getting it back can cost far more. */
        PyThreadState *released = rows >= GIL_FREE_ROWS ? PyEval_SaveThread() : NULL;
        for (Py_ssize_t i = 0; i < rows; i++) {
            const int64_t r = row[i];
            const double *x = values + i * sensors;
            double *ring = history + r * span * sensors, *smooth = smoothed + r * alphas * sensors,
                   *feature = out + i * features;
            /* A first message, or a cycle not after the last one: a new lifetime, from nothing. */
            const int fresh = count[r] == 0 || cycles[i] <= cycle[r];
            cycle[r] = cycles[i];
            count[r] = fresh ? 1 : count[r] + 1;
            const int64_t slot = fresh ? 0 : start[r]; /* the oldest value's, or a new lifetime's first */
            start[r] = (slot + 1) % span;
            memcpy(ring + slot * sensors, x, sensors * sizeof(double));
            for (Py_ssize_t a = 0; a < alphas; a++)
                for (Py_ssize_t s = 0; s < sensors; s++)
                    smooth[a * sensors + s] =
                        fresh ? x[s] : alpha[a] * x[s] + (1.0 - alpha[a]) * smooth[a * sensors + s];
            if (cycle_column >= 0) feature[cycle_column] = (double)cycles[i];
            for (Py_ssize_t s = 0; s < sensors; s++) feature[raw_columns[s]] = x[s];
            for (Py_ssize_t j = 0; j < windows; j++) { /* each over its own last w slots, as the batch slides it */
                const Py_ssize_t w = window[j];
                row_statistics(ring, span, (start[r] + span - w) % span, w, sensors, count[r] < w ? count[r] : w,
                               wanted, codes, n_codes, sums, stats, sensors);
                for (Py_ssize_t c = 0; c < n_codes; c++)
                    for (Py_ssize_t s = 0; s < sensors; s++)
                        feature[stats_columns[(c * windows + j) * sensors + s]] = stats[c * sensors + s];
            }
            for (Py_ssize_t k = 0; k < alphas * sensors; k++) feature[ewm_columns[k]] = smooth[k];
        }
        if (released != NULL) PyEval_RestoreThread(released);
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(sums);
    for (int i = 0; i < N_UPDATE_BUFFERS; i++)
        if (b[i].obj != NULL) PyBuffer_Release(&b[i]);
    return result;
}

static PyMethodDef methods[] = {
    {"statistics", statistics, METH_VARARGS,
     "statistics(window, windows, span, sensors, w, count, codes, out) -> None\n\n"
     "Writes the statistics `codes` names (bytes: 0 mean, 1 std, 2 slope, 3 min, 4 max) of the last `w` "
     "slots of each window into `out` (float64, codes x windows x sensors). `window` is float64, "
     "windows x span x sensors, slots in time order; `count` (int64, one per window): how many of the w "
     "slots are valid, the last ones."},
    {"update", update, METH_VARARGS,
     "update(history, span, sensors, start, count, cycle, smoothed, alphas, rows, cycles, values, windows, codes, "
     "features, cycle_column, raw_columns, stats_columns, ewm_columns, out) -> None\n\n"
     "Takes one message for each state row `rows` names (int64) and writes its feature row into `out` (float64, "
     "rows x features). The state, updated in place: `history` float64, devices x span x sensors, rings whose "
     "oldest slot, where the next value goes, is `start`; `count` (messages in the lifetime, 0: none) and `cycle` "
     "(the last), int64 per device; `smoothed` float64, devices x alphas x sensors, smoothed by `alphas`. A "
     "message (its `cycles` int64 and `values` float64, rows x sensors) starts a new lifetime when the row's count "
     "is 0 or its cycle is not after the last one. Feature columns: the cycle at `cycle_column` (-1: none), the "
     "values at `raw_columns` (sensors), the statistics `codes` names (as for `statistics`) of each of the "
     "`windows` (int64, 1 to span) at `stats_columns` (codes x windows x sensors), the smoothed values at "
     "`ewm_columns` (alphas x sensors); columns int64."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_windows",
    .m_doc = "Rolling-window statistics of sensor values and the streaming features' update.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__windows(void) { return PyModule_Create(&module); }
