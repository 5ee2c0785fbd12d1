/*
 * Group commit of the edge store's WAL on a thread that never takes the interpreter
 * (edge_module/store.py, `_WalSync`).
 *
 * Why C: the store's commits are counted; a thread fsyncs the WAL for every commit made while
 * the fsync before ran, and a commit is answered once its fsync is done. Written in Python, that
 * thread took the interpreter after each fsync to count it and to wake the event loop, and the
 * request thread took it back at its next step: at 1,000 single messages a second the two passed
 * the interpreter back and forth about twice a message, which cost as much as the commit itself.
 * Here the thread works under a mutex of its own and tells the event loop through a pipe, which
 * the loop watches (`fileno`): the interpreter is only ever held by the threads that run Python.
 *
 * After a failed fsync no later commit is acknowledged (the kernel may have dropped the unwritten
 * pages): `synced` raises that error from then on, and `wait` for any commit not synced before it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    int fd;          /* the WAL, owned by the caller */
    int pipe[2];     /* a byte written to [1] after each fsync; the event loop reads [0] */
    pthread_t thread;
    pthread_mutex_t mutex;
    pthread_cond_t changed; /* a commit counted, an fsync done, or closing */
    int64_t committed, synced;
    int error;       /* errno of the fsync that failed; 0 while none has */
    int closing, started, closed;
} Syncer;

static int datasync(int fd) {
#if defined(__APPLE__)
    return fsync(fd); /* macOS has no fdatasync */
#else
    return fdatasync(fd);
#endif
}

static void *run(void *arg) {
    Syncer *self = arg;
    pthread_mutex_lock(&self->mutex);
    for (;;) {
        while (self->committed == self->synced && !self->closing) pthread_cond_wait(&self->changed, &self->mutex);
        if (self->committed == self->synced) break; /* closing with nothing left to sync */
        const int64_t target = self->committed;
        pthread_mutex_unlock(&self->mutex);
        const int failed = datasync(self->fd) != 0 ? errno : 0;
        pthread_mutex_lock(&self->mutex);
        if (failed)
            self->error = failed;
        else
            self->synced = target;
        pthread_cond_broadcast(&self->changed);
        /* Non-blocking: a full pipe already holds a wake-up the loop has not read. */
        const char byte = 1;
        ssize_t ignored = write(self->pipe[1], &byte, 1);
        (void)ignored;
        if (failed) break;
    }
    pthread_mutex_unlock(&self->mutex);
    return NULL;
}

static PyObject *raise_error(int error) {
    errno = error;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static int Syncer_init(Syncer *self, PyObject *args, PyObject *Py_UNUSED(kwargs)) {
    if (self->started) {
        PyErr_SetString(PyExc_RuntimeError, "a Syncer is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "i", &self->fd)) return -1;
    if (pipe(self->pipe) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    for (int i = 0; i < 2; i++) {
        if (fcntl(self->pipe[i], F_SETFL, O_NONBLOCK) != 0 || fcntl(self->pipe[i], F_SETFD, FD_CLOEXEC) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            close(self->pipe[0]);
            close(self->pipe[1]);
            return -1;
        }
    }
    pthread_mutex_init(&self->mutex, NULL);
    pthread_cond_init(&self->changed, NULL);
    const int failed = pthread_create(&self->thread, NULL, run, self);
    if (failed) {
        close(self->pipe[0]);
        close(self->pipe[1]);
        raise_error(failed);
        return -1;
    }
    self->started = 1;
    return 0;
}

/* Stop the thread once every commit counted is synced (or an fsync failed). The caller, holding
 * the interpreter, has checked and set `closed`, so this runs once. The pipe stays open until the
 * object goes: an event loop may still be watching it. */
static void stop(Syncer *self) {
    pthread_mutex_lock(&self->mutex);
    self->closing = 1;
    pthread_cond_broadcast(&self->changed);
    pthread_mutex_unlock(&self->mutex);
    pthread_join(self->thread, NULL);
}

static PyObject *Syncer_committed(Syncer *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->mutex);
    if (self->closing) {
        pthread_mutex_unlock(&self->mutex);
        PyErr_SetString(PyExc_RuntimeError, "the store is closed");
        return NULL;
    }
    const int64_t number = ++self->committed;
    pthread_cond_broadcast(&self->changed); /* the thread, and any waiter (the condition is shared) */
    pthread_mutex_unlock(&self->mutex);
    return PyLong_FromLongLong(number);
}

static PyObject *Syncer_committed_so_far(Syncer *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->mutex);
    const int64_t number = self->committed;
    pthread_mutex_unlock(&self->mutex);
    return PyLong_FromLongLong(number);
}

static PyObject *Syncer_synced(Syncer *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->mutex);
    const int64_t number = self->synced;
    const int error = self->error;
    pthread_mutex_unlock(&self->mutex);
    return error ? raise_error(error) : PyLong_FromLongLong(number);
}

static PyObject *Syncer_wait(Syncer *self, PyObject *args) {
    long long number;
    if (!PyArg_ParseTuple(args, "L", &number)) return NULL;
    int error, beyond;
    Py_BEGIN_ALLOW_THREADS;
    pthread_mutex_lock(&self->mutex);
    beyond = number > self->committed; /* would never come: the thread syncs only what was counted */
    while (!beyond && self->synced < number && !self->error) pthread_cond_wait(&self->changed, &self->mutex);
    error = self->synced < number ? self->error : 0;
    pthread_mutex_unlock(&self->mutex);
    Py_END_ALLOW_THREADS;
    if (beyond) {
        PyErr_Format(PyExc_ValueError, "commit %lld was never counted", number);
        return NULL;
    }
    if (error) return raise_error(error);
    Py_RETURN_NONE;
}

static PyObject *Syncer_fileno(Syncer *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(self->pipe[0]);
}

static PyObject *Syncer_close(Syncer *self, PyObject *Py_UNUSED(ignored)) {
    if (self->started && !self->closed) {
        self->closed = 1;
        Py_BEGIN_ALLOW_THREADS;
        stop(self);
        Py_END_ALLOW_THREADS;
    }
    Py_RETURN_NONE;
}

static void Syncer_dealloc(Syncer *self) {
    if (self->started && !self->closed) {
        self->closed = 1;
        stop(self);
    }
    if (self->started) {
        close(self->pipe[0]);
        close(self->pipe[1]);
        pthread_cond_destroy(&self->changed);
        pthread_mutex_destroy(&self->mutex);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Syncer_methods[] = {
    {"committed", (PyCFunction)Syncer_committed, METH_NOARGS, "Count one more commit; return its number."},
    {"committed_so_far", (PyCFunction)Syncer_committed_so_far, METH_NOARGS, "The number of the last commit."},
    {"synced", (PyCFunction)Syncer_synced, METH_NOARGS,
     "The number of the last commit fsync'd; OSError if an fsync failed."},
    {"wait", (PyCFunction)Syncer_wait, METH_VARARGS,
     "wait(number): return once that commit is fsync'd (the interpreter let go meanwhile); OSError if "
     "an fsync failed first."},
    {"fileno", (PyCFunction)Syncer_fileno, METH_NOARGS,
     "A pipe that gets a byte after each fsync (non-blocking), for an event loop to watch."},
    {"close", (PyCFunction)Syncer_close, METH_NOARGS,
     "Stop once every commit counted is fsync'd; no commit may be counted from then on."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SyncerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edge_module._wal_sync.Syncer",
    .tp_basicsize = sizeof(Syncer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Syncer(fd): fsyncs fd on a thread of its own for the commits counted, in groups.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Syncer_init,
    .tp_dealloc = (destructor)Syncer_dealloc,
    .tp_methods = Syncer_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wal_sync", "Group commit of a WAL on a thread without the interpreter.", -1, NULL,
};

PyMODINIT_FUNC PyInit__wal_sync(void) {
    if (PyType_Ready(&SyncerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Syncer", (PyObject *)&SyncerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
