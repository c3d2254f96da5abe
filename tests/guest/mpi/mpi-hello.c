/* vtorque MPI guest's test program (tests/guest/mpi/README.md): every rank prints one line with its rank, the
 * world size and its host, then rank 0 prints the MPI_Allreduce sum of (rank + 1) over all ranks, which must be
 * size * (size + 1) / 2. The test reads these lines, so their shape is part of the image's contract. */
#include <mpi.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rank, size, mine, sum = 0;
    char host[256] = "?";

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host - 1);
    printf("VT-MPI rank=%d size=%d host=%s\n", rank, size, host);
    fflush(stdout);
    mine = rank + 1;
    MPI_Allreduce(&mine, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0)
        printf("VT-MPI allreduce-sum=%d expected=%d\n", sum, size * (size + 1) / 2);
    fflush(stdout);
    MPI_Finalize();
    return sum == size * (size + 1) / 2 ? 0 : 1;
}
