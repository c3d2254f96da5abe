/* vtorque MPI guest's test program (tests/guest/mpi/README.md): every rank prints one line with its rank, the
 * world size and its host, then rank 0 prints the MPI_Allreduce sum of (rank + 1) over all ranks, which must be
 * size * (size + 1) / 2. The test reads these lines, so their shape is part of the image's contract.
 *
 * `vt-mpi-hello ROUNDS [MS]` then goes on for ROUNDS more allreduces, MS milliseconds apart (1000 by default):
 * a program that is still talking over the job network while a guest of it is moved (tests/e2e/test_rig_mpi.py,
 * live migration). Rank 0 prints one line per round with the sum and the seconds since the round before, then
 * how many rounds had the right sum; the exit status is 0 only if every one had. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rank, size, mine, sum = 0, rounds = 0, pause_ms = 1000, first_right, rounds_right = 0, expected;
    char host[256] = "?";
    double before, now;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc > 1)
        rounds = atoi(argv[1]);
    if (argc > 2)
        pause_ms = atoi(argv[2]);
    gethostname(host, sizeof host - 1);
    printf("VT-MPI rank=%d size=%d host=%s\n", rank, size, host);
    fflush(stdout);
    expected = size * (size + 1) / 2;
    mine = rank + 1;
    MPI_Allreduce(&mine, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0)
        printf("VT-MPI allreduce-sum=%d expected=%d\n", sum, expected);
    fflush(stdout);
    first_right = sum == expected;
    before = MPI_Wtime();
    for (int i = 1; i <= rounds; i++) {
        usleep((useconds_t)pause_ms * 1000);
        sum = 0;
        MPI_Allreduce(&mine, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        rounds_right += sum == expected;
        now = MPI_Wtime();
        if (rank == 0) {
            printf("VT-MPI round=%d sum=%d took=%.3f\n", i, sum, now - before);
            fflush(stdout);
        }
        before = now;
    }
    if (rounds > 0 && rank == 0)
        printf("VT-MPI rounds-right=%d of %d\n", rounds_right, rounds);
    fflush(stdout);
    MPI_Finalize();
    return first_right && rounds_right == rounds ? 0 : 1;
}
